"""The command line: the parser and dispatch (main), the launcher side of a run and the worker's
lifecycle (run), plan and bounds printing (plan), status and the analysis of finished runs."""
