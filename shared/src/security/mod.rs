//! Guards on user-supplied locations. `paths`: local storages stay inside the
//! document root, whatever `..` or symlinks they contain.
pub mod paths;
