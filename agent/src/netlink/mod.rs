//! The only module that touches rtnetlink: idempotent ensure/replace/delete helpers.
