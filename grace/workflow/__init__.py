"""The MLOps workflows around GRACE: pipeline steps, MLflow tracking, the model registry, watching.

The steps (:mod:`grace.workflow.steps`) are plain functions the KFP components and the CLI call.
"""
