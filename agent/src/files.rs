//! subnet.env and Docker options files, written atomically.
//!
//! The formats are flannel's (`subnet.env`) and `mk-docker-opts.sh`'s, byte for byte.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("write {path}: {source}; check that the directory exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read {path}: {source}; is the agent running and --subnet-file right?")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid value of FLANNEL_IPMASQ: {value} (in {path}); it must be true or false")]
    BadIpMasq { path: PathBuf, value: String },
}

/// What flannel writes to the subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// 0.0.0.0/0 (with `subnet`) when IPv4 is off: the IPv4 lines are left out, as flanneld does.
    pub network: Ipv4Net,
    /// Our lease; the file carries its first host address (`10.1.10.1/24`), Docker's bridge IP.
    pub subnet: Ipv4Net,
    /// `IPv6Network` and our IPv6 subnet, when IPv6 is on.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// flanneld's `WriteSubnetFile`: the IPv4 lines, the IPv6 lines, then MTU and IPMASQ; each
    /// subnet as its first address with the prefix (`10.1.10.1/24`, `fd00:10:1::1/64`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.subnet.prefix_len() != 0 {
            let first = Ipv4Net::new(
                u32::from(self.subnet.network()).wrapping_add(1).into(),
                self.subnet.prefix_len(),
            )
            .unwrap_or(self.subnet);
            out += &format!("FLANNEL_NETWORK={}\nFLANNEL_SUBNET={first}\n", self.network);
        }
        if let Some((network, subnet)) = self.ipv6 {
            let first = Ipv6Net::new(
                u128::from(subnet.network()).wrapping_add(1).into(),
                subnet.prefix_len(),
            )
            .unwrap_or(subnet);
            out += &format!("FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={first}\n");
        }
        out + &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq)
    }

    /// The Docker options CoreOS wrote to `/run/flannel/flannel_docker_opts.env` (individual variables).
    pub fn docker_opts(&self) -> String {
        let opts = DockerOpts {
            individual: true,
            combined: false,
            ..DockerOpts::default()
        };
        opts.render(&parse_env(&self.render()), None)
            .unwrap_or_default()
    }
}

/// Write `bytes` to `path` through a temporary file and rename, mode 0644, so readers see
/// the old or the new file, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    let err = |source| FilesError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the create mode.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// `KEY=value` lines as the shell would source them (no quoting beyond stripping one pair).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| !k.starts_with('#'))
        .map(|(k, v)| {
            (
                k.trim_start_matches("export ").to_string(),
                v.trim_matches('"').to_string(),
            )
        })
        .collect()
}

pub fn read_env(path: &Path) -> Result<BTreeMap<String, String>, FilesError> {
    std::fs::read_to_string(path)
        .map(|t| parse_env(&t))
        .map_err(|source| FilesError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// `mk-docker-opts.sh` options: `-i` individual, `-c` combined (both when neither), `-k` key, `-m`.
#[derive(Debug, Clone)]
pub struct DockerOpts {
    pub individual: bool,
    pub combined: bool,
    pub combined_key: String,
    pub no_ipmasq: bool,
}

impl Default for DockerOpts {
    fn default() -> Self {
        DockerOpts {
            individual: false,
            combined: false,
            combined_key: "DOCKER_OPTS".into(),
            no_ipmasq: false,
        }
    }
}

impl DockerOpts {
    /// The script's output for the sourced subnet file `env`. `existing` is the current value
    /// of the combined variable in the environment, which the script prepends.
    pub fn render(
        &self,
        env: &BTreeMap<String, String>,
        existing: Option<&str>,
    ) -> Result<String, FilesError> {
        let (individual, combined) = match (self.individual, self.combined) {
            (false, false) => (true, true),
            other => other,
        };
        // Ordered as `set | grep DOCKER_OPT_` lists them: by name.
        let mut vars: BTreeMap<&str, String> = BTreeMap::new();
        if let Some(s) = env.get("FLANNEL_SUBNET").filter(|s| !s.is_empty()) {
            vars.insert("DOCKER_OPT_BIP", format!("--bip={s}"));
        }
        if let Some(m) = env.get("FLANNEL_MTU").filter(|s| !s.is_empty()) {
            vars.insert("DOCKER_OPT_MTU", format!("--mtu={m}"));
        }
        if let Some(masq) = env
            .get("FLANNEL_IPMASQ")
            .filter(|s| !s.is_empty() && !self.no_ipmasq)
        {
            let docker_masq = match masq.as_str() {
                "true" => "false",
                "false" => "true",
                other => {
                    return Err(FilesError::BadIpMasq {
                        path: PathBuf::from("subnet file"),
                        value: other.into(),
                    })
                }
            };
            vars.insert("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker_masq}"));
        }
        let mut out = String::new();
        let mut all = existing
            .filter(|s| !s.is_empty())
            .map(|s| format!("{s} "))
            .unwrap_or_default();
        for (name, value) in &vars {
            if individual {
                out.push_str(&format!("{name}=\"{value}\"\n"));
            }
            all.push(' ');
            all.push_str(value);
        }
        if combined {
            out.push_str(&format!("{}=\"{all}\"\n", self.combined_key));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.1.0.0/16".parse().unwrap(),
            subnet: "10.1.10.0/24".parse().unwrap(),
            ipv6: None,
            mtu: 1450,
            ipmasq: true,
        }
    }

    #[test]
    fn subnet_env_bytes() {
        assert_eq!(env().render(), "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.10.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let dual = SubnetEnv {
            ipv6: Some((
                "fd00:10::/48".parse().unwrap(),
                "fd00:10:0:a::/64".parse().unwrap(),
            )),
            ..env()
        };
        assert_eq!(dual.render(), "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.10.1/24\nFLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET=fd00:10:0:a::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let only6 = SubnetEnv {
            network: Ipv4Net::default(),
            subnet: Ipv4Net::default(),
            ..dual.clone()
        };
        assert_eq!(only6.render(), "FLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET=fd00:10:0:a::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        // mk-docker-opts.sh knows no IPv6 variable: the Docker options stay the IPv4 ones.
        assert_eq!(dual.docker_opts(), env().docker_opts());
    }

    #[test]
    fn docker_opts_bytes() {
        let e = parse_env(&env().render());
        let all = DockerOpts::default().render(&e, None).unwrap();
        assert_eq!(
            all,
            "DOCKER_OPT_BIP=\"--bip=10.1.10.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.1.10.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        let c = DockerOpts {
            combined: true,
            combined_key: "X".into(),
            no_ipmasq: true,
            ..Default::default()
        };
        assert_eq!(
            c.render(&e, Some("--debug")).unwrap(),
            "X=\"--debug  --bip=10.1.10.1/24 --mtu=1450\"\n"
        );
        assert_eq!(env().docker_opts(), "DOCKER_OPT_BIP=\"--bip=10.1.10.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n");
        let mut bad = e.clone();
        bad.insert("FLANNEL_IPMASQ".into(), "maybe".into());
        assert!(DockerOpts::default()
            .render(&bad, None)
            .unwrap_err()
            .to_string()
            .contains("FLANNEL_IPMASQ: maybe"));
    }

    #[test]
    fn atomic_write_mode_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/subnet.env");
        write_atomic(&p, b"a\n").unwrap();
        write_atomic(&p, env().render().as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), env().render());
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(
            std::fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
