"""The training loop's parts: processes and precision (runtime, distributed, cpu, precision,
flops, memory), the optimizer and schedules (optim), the time budget and sizing (budget, sizing,
compile_choice), the loop's state (loop_state), periodic actions (actions) and stop requests
(preemption, requeue)."""
