"""The fusion run as stages: documents → capture → train → evaluate → export, each resumable."""
