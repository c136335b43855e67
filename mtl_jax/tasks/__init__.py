"""Task types: what each kind of task reads, how its head is scored and what it predicts."""
