"""realm-hpc: REALM retrieval-augmented pretraining and Open-QA fine-tuning."""

__version__ = "0.1.0"
