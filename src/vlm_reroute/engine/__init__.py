"""What every method shares: the routing executor, schedules, selection, masks, the KV cache and the trace."""
