"""The training loop's parts: processes and precision (runtime, distributed, cpu, precision,
flops, memory), the optimizer and schedules (optim), the time budget and sizing (budget, sizing),
the loop's state (loop_state), periodic jobs (actions), stop requests (preemption, requeue) and
the faults tests inject (faults)."""
