"""Trust: who may join the cluster and who may use it."""
