//! Network config from `<prefix>/config`: parsing, defaults, validation.
