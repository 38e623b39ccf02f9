//! Subnet leases: the store trait, the etcd store and the pure allocator.
