"""A sans-I/O Raft core in the style of etcd-io/raft. See docs/ARCHITECTURE.md."""
