"""`asyncrl bench ...`: each component against a named baseline, in one process, ending with the ratio."""
