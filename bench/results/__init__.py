"""What a run leaves and what is read from it: point records and their atomic writers, the summary, scaling
figures, the report and plots, and comparisons of two folders (cli -> plan -> launch -> ranks -> results)."""
