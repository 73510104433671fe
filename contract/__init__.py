"""The contract between infra and the trainer: the schema, the pod environment, the volume layout. No torch, no cloud."""
