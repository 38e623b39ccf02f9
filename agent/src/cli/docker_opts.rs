//! `weft docker-opts`: mk-docker-opts.sh, same letters, same output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{exit, fail};
use crate::files::{self, DockerOpts};

/// mk-docker-opts.sh's options, same letters.
#[derive(Debug, Args)]
pub struct DockerOptsArgs {
    /// Path to flannel env file.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    flannel_env: PathBuf,
    /// Path to Docker env file to write to.
    #[arg(short = 'd', default_value = "/run/docker_opts.env")]
    docker_env: PathBuf,
    /// Output each Docker option as individual var, e.g. DOCKER_OPT_MTU=1500.
    #[arg(short = 'i')]
    individual: bool,
    /// Output combined Docker options into the DOCKER_OPTS var.
    #[arg(short = 'c')]
    combined: bool,
    /// Set the combined options key to this value.
    #[arg(short = 'k', default_value = "DOCKER_OPTS")]
    key: String,
    /// Do not output --ip-masq (useful for older Docker versions).
    #[arg(short = 'm')]
    no_ipmasq: bool,
}

pub fn run(a: &DockerOptsArgs) -> ExitCode {
    // The script sources the file only when it exists; a missing file yields empty options.
    let env = if a.flannel_env.is_file() {
        match files::read_env(&a.flannel_env) {
            Ok(e) => e,
            Err(e) => return fail(exit::OTHER, e),
        }
    } else {
        Default::default()
    };
    let opts = DockerOpts {
        individual: a.individual,
        combined: a.combined,
        combined_key: a.key.clone(),
        no_ipmasq: a.no_ipmasq,
    };
    let existing = std::env::var(&a.key).ok();
    match opts.render(&env, existing.as_deref()) {
        Ok(text) => match files::write_atomic(&a.docker_env, text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(exit::OTHER, e),
        },
        Err(e) => fail(exit::OTHER, e),
    }
}
