//! subnet.env and Docker options files, written atomically.
