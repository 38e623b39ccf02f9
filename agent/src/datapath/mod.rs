//! The only module that touches aya: load, attach, pin, typed map wrappers.
