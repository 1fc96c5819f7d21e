"""Launchers: sbatch files rendered from config, submitit submission, requeue after preemption."""
