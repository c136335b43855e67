"""The network: the DistilBERT encoder over packed rows, dense layers, LoRA, pretrained checkpoints, the multi-task model."""
