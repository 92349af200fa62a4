"""What a run leaves and what is read from it: point records and their atomic writers, the summary, scaling
figures, the report and plots, and comparisons of two folders. Just above plan, so the launcher and the rank
programs write records through it (docs/design.md "Layers")."""
