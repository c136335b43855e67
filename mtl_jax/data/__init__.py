"""Reading and batching: files to validated examples, splits, sampling, packed rows."""
