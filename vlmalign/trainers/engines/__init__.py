"""Running on existing distributed engines (DDP, FSDP2, DeepSpeed ZeRO): engine detection, start-up checks, and
the switch that lets accelerate engage FSDP / DeepSpeed on a CPU-only machine (gloo)."""
