"""The trainer side of the stack: training jobs that publish checkpoints safely, and deployments that swap a
published checkpoint into every replica of the policy or value service (docs/trainer-service.md)."""
