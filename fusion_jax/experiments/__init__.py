"""What is built on the pipeline: the built-in demo, the CLM-baseline comparison and its report."""
