//! `weft config get|set`: the network config at `<prefix>/config`.

use std::process::ExitCode;

use clap::Subcommand;

use super::etcd::EtcdArgs;
use super::{exit, fail, with_store};
use crate::config::NetworkConfig;
use crate::subnet::SubnetStore;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the stored network config.
    Get {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Validate and store a network config; an invalid one is never written.
    Set {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The config JSON, e.g. '{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}'.
        json: String,
    },
}

pub fn run(cmd: ConfigCmd) -> ExitCode {
    match cmd {
        ConfigCmd::Set { etcd, json } => {
            let opts = match etcd.validate() {
                Ok(o) => o,
                Err(e) => return fail(exit::USAGE, e),
            };
            if let Err(e) = NetworkConfig::parse(&json) {
                return fail(exit::CONFIG, format!("not stored: {e}"));
            }
            with_store(&opts, |store| async move {
                store.put_config(&json).await?;
                println!("stored network config at {}", store.config_key());
                Ok(exit::OK)
            })
        }
        ConfigCmd::Get { etcd } => match etcd.validate() {
            Err(e) => fail(exit::USAGE, e),
            Ok(opts) => with_store(&opts, |store| async move {
                let Some(json) = store.get_config().await? else {
                    eprintln!(
                        "weft: no network config at {}; write one with `weft config set '<json>'`",
                        store.config_key()
                    );
                    return Ok(exit::CONFIG);
                };
                println!("{json}");
                if let Err(e) = NetworkConfig::parse(&json) {
                    eprintln!("weft: warning: this config is invalid: {e}");
                    return Ok(exit::CONFIG);
                }
                Ok(exit::OK)
            }),
        },
    }
}
