//! The etcd flags every subcommand that talks to etcd shares.

use std::path::PathBuf;

use clap::Args;

use super::args;
use super::UsageError;
use crate::subnet::EtcdOptions;

#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "WEFT_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        value_parser = args::etcd_endpoint
    )]
    etcd_endpoints: Vec<String>,
    /// etcd prefix holding config and subnets.
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/coreos.com/network", value_parser = args::etcd_prefix)]
    etcd_prefix: String,
    /// CA certificate to verify etcd with.
    #[arg(long, env = "WEFT_ETCD_CAFILE", value_parser = args::existing_file)]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, env = "WEFT_ETCD_CERTFILE", value_parser = args::existing_file)]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, env = "WEFT_ETCD_KEYFILE", value_parser = args::existing_file)]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "WEFT_ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "WEFT_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
}

impl EtcdArgs {
    /// The checks that span several flags; each value was parsed by clap already.
    pub fn validate(&self) -> Result<EtcdOptions, UsageError> {
        if self.etcd_endpoints.is_empty() {
            return Err(UsageError::new(
                "etcd-endpoints",
                "",
                "give at least one endpoint",
            ));
        }
        if self.etcd_certfile.is_some() != self.etcd_keyfile.is_some() {
            return Err(UsageError::new(
                "etcd-certfile",
                "",
                "--etcd-certfile and --etcd-keyfile go together",
            ));
        }
        if self.etcd_cafile.is_some() || self.etcd_certfile.is_some() {
            if let Some(plain) = self
                .etcd_endpoints
                .iter()
                .find(|e| e.starts_with("http://"))
            {
                return Err(UsageError::new(
                    "etcd-endpoints",
                    plain,
                    "TLS files are given, so every endpoint must be https://",
                ));
            }
        }
        if self.etcd_username.is_some() != self.etcd_password.is_some() {
            return Err(UsageError::new(
                "etcd-username",
                "",
                "--etcd-username and --etcd-password go together",
            ));
        }
        Ok(EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            cafile: self.etcd_cafile.clone(),
            certfile: self.etcd_certfile.clone(),
            keyfile: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        })
    }
}
