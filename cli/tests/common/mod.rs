//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A `myriad` process, SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    banner: String,
}

impl Proc {
    pub fn start(args: &[&str]) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = Command::new(env!("CARGO_BIN_EXE_myriad"))
            .args(args)
            .current_dir(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start myriad");
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        assert!(!banner.is_empty(), "{args:?} exited before its banner");
        Proc { child, banner }
    }

    pub fn word(&self, n: usize) -> String {
        self.banner.split_whitespace().nth(n).unwrap_or_else(|| panic!("banner `{}`", self.banner)).to_string()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
