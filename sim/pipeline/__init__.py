"""What moves batches between blocks and processes: placement, schedules as data, stages, the
transport (in-process or torch.distributed), the two engines, replicas, the process group. Never imports run."""
