"""qhm-launch: the runtime that trains with QHM and increasing batch size under torchrun / DeepSpeed."""
