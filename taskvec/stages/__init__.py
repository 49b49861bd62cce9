"""Pipeline stages: each reads a run through taskvec.runs."""
