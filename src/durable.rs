//! Durable file writes shared by every module that keeps metadata on disk: replacing a file
//! atomically and making a directory's entries durable.
//!
//! A leaf: it imports nothing of Ferry's, so `log`, `broker` and `failover` can all use it
//! without importing each other. Does not own what the files hold or when to write them.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Write a file atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("file in a directory");
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// fsync a directory so that file creations and deletions in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
