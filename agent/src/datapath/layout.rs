//! Versioned pinned state: which layout the pinned maps have, and carrying an
//! incompatible set over into maps of this build's layout.
//!
//! The kernel itself records each map's type, key size, value size and
//! entries; a pinned set is compatible when every map matches what this
//! build's programs declare. An incompatible set (another layout version) is
//! moved aside, fresh maps are created and filled from it (remote subnets,
//! VTEPs, local bindings; the node configuration is written by the agent), the
//! pinned links are switched to the new programs with `BPF_LINK_UPDATE` (the
//! old programs forward with the old maps until that instant), the old
//! counters are added to the new ones, and the old maps are unpinned.

use std::{
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, MapType, PerCpuArray, PerCpuValues};
use weft_common::{
    counter, map_names, map_names6, LocalEndpoint, NodeConfig, NodeConfig6, VtepValue,
    LAYOUT_VERSION, MAX_LOCAL, MAX_PEERS,
};

use super::{
    maps::{map_err, MapFamily},
    pins::PinDir,
    DatapathError,
};

/// What one map must look like for this build's programs.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    /// The layout that introduced the map: a set of an older layout lacks it,
    /// and the new map starts empty (the agent fills it).
    since: u32,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

impl Shape {
    /// The remote-subnet, VTEP and local-binding maps of `A`'s family, new in layout `since`.
    const fn family<A: MapFamily>(since: u32) -> [Shape; 3] {
        let address = size::<A::Octets>();
        [
            Shape {
                name: A::REMOTES,
                since,
                map_type: MapType::LpmTrie,
                // The prefix length (u32) before the address.
                key_size: 4 + size::<A::Lpm>(),
                value_size: size::<A::Peer>(),
                max_entries: MAX_PEERS,
            },
            Shape::hash(A::VTEPS, since, address, size::<VtepValue>(), MAX_PEERS),
            Shape::hash(A::LOCAL, since, address, size::<LocalEndpoint>(), MAX_LOCAL),
        ]
    }

    /// A hash map keyed by an address.
    const fn hash(
        name: &'static str,
        since: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Shape {
        Shape {
            name,
            since,
            map_type: MapType::Hash,
            key_size,
            value_size,
            max_entries,
        }
    }

    /// An array of one `T` (a node configuration).
    const fn config<T>(name: &'static str, since: u32) -> Shape {
        Shape {
            name,
            since,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<T>(),
            max_entries: 1,
        }
    }
}

const V4: [Shape; 3] = Shape::family::<Ipv4Addr>(1);
const V6: [Shape; 3] = Shape::family::<Ipv6Addr>(3);

const SHAPES: [Shape; 9] = [
    V4[0],
    V4[1],
    Shape::config::<NodeConfig>(map_names::CONFIG, 1),
    Shape {
        name: map_names::COUNTERS,
        since: 1,
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: counter::COUNT,
    },
    V4[2],
    V6[0],
    V6[1],
    Shape::config::<NodeConfig6>(map_names6::CONFIG6, 3),
    V6[2],
];

/// A pinned map set another layout made.
#[derive(Debug)]
pub(super) struct Previous {
    /// Where the old maps are pinned now (moved aside when they were the plain `maps`).
    pub dir: PathBuf,
    /// The layout version in its name; `None` for a set from before layout versions.
    pub version: Option<u32>,
    /// How it differs from ours, for the log.
    pub differences: Vec<String>,
}

impl Previous {
    pub fn describe(&self) -> String {
        self.version.map_or_else(
            || "from before layout versions".to_string(),
            |v| format!("layout {v}"),
        )
    }
}

/// The layout version in a map directory's name (`maps-v<N>`).
fn version_of(dir: &Path) -> Option<u32> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("maps-v")?
        .parse()
        .ok()
}

/// One way a pinned map differs from this build's.
struct Difference {
    text: String,
    /// Its entries can be carried over: the node config (rewritten anyway),
    /// counters of another count, other maps with the same entry shape.
    convertible: bool,
}

fn compare(dir: &Path) -> Vec<Difference> {
    let mut out = Vec::new();
    for shape in &SHAPES {
        let path = dir.join(shape.name);
        if shape.since > 1 && !path.exists() {
            // A set of an older layout: this map is new and starts empty.
            out.push(Difference {
                text: format!("{}: absent (new in layout {})", shape.name, shape.since),
                convertible: true,
            });
            continue;
        }
        let info = match MapData::from_pin(&path).and_then(|m| m.info()) {
            Ok(info) => info,
            Err(e) => {
                out.push(Difference {
                    text: format!("{}: unreadable ({e})", shape.name),
                    convertible: false,
                });
                continue;
            }
        };
        let theirs = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let ours = (
            Some(shape.map_type),
            shape.key_size,
            shape.value_size,
            shape.max_entries,
        );
        if theirs != ours {
            let same_entries = theirs.0 == ours.0 && theirs.1 == ours.1 && theirs.2 == ours.2;
            out.push(Difference {
                text: format!(
                    "{}: key {} value {} entries {} (this build: key {} value {} entries {})",
                    shape.name, theirs.1, theirs.2, theirs.3, ours.1, ours.2, ours.3
                ),
                convertible: shape.name == map_names::CONFIG || same_entries,
            });
        }
    }
    out
}

/// How the set in `dir` differs from this build's (empty: compatible); an
/// error, before anything moves, when its entries cannot be carried over
/// (the old programs keep forwarding).
fn convertible(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let compared = compare(dir);
    if let Some(d) = compared.iter().find(|d| !d.convertible) {
        return Err(DatapathError::Incompatible {
            reason: d.text.clone(),
        });
    }
    Ok(compared.into_iter().map(|d| d.text).collect())
}

/// How the pinned set in `dir` differs from this build's; empty when compatible.
pub(super) fn differences(dir: &Path) -> Vec<String> {
    compare(dir).into_iter().map(|d| d.text).collect()
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::PinDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `maps-v<LAYOUT_VERSION>` the place to load into. Returns the pinned
/// set of another layout when there is one (moved out of the way, still
/// pinned, its programs still forwarding).
pub(super) fn prepare(pins: &PinDir) -> Result<Option<Previous>, DatapathError> {
    let live = pins.live_maps();
    let ours = pins.maps_of(LAYOUT_VERSION);
    std::fs::create_dir_all(pins.root()).map_err(io_err(pins.root()))?;
    let current = if live.is_symlink() {
        let target = std::fs::read_link(&live).map_err(io_err(&live))?;
        Some(pins.root().join(target))
    } else if live.is_dir() {
        Some(live.clone())
    } else {
        interrupted(pins, &ours)
    };
    let previous = match current {
        Some(dir) if dir.join(map_names::CONFIG).exists() => {
            let differences = convertible(&dir)?;
            if differences.is_empty() {
                if dir != ours {
                    // A plain `maps` of our layout (a build from before
                    // versions): give it its versioned name, no reload needed.
                    clear(&ours)?;
                    move_pins(&dir, &ours)?;
                }
                // Ours is live; an older set left by a change that stopped
                // before its end (the agent died) is carried over now.
                match interrupted(pins, &ours) {
                    Some(dir) => Some(Previous {
                        version: version_of(&dir),
                        differences: convertible(&dir)?,
                        dir,
                    }),
                    None => None,
                }
            } else {
                let version = version_of(&dir);
                let dir = if dir == live {
                    let aside = pins.root().join("maps-unversioned");
                    clear(&aside)?;
                    move_pins(&dir, &aside)?;
                    aside
                } else {
                    dir
                };
                // Ours is not live: what is there is from an attempt that stopped.
                clear(&ours)?;
                Some(Previous {
                    dir,
                    version,
                    differences,
                })
            }
        }
        _ => None,
    };
    std::fs::create_dir_all(&ours).map_err(io_err(&ours))?;
    Ok(previous)
}

/// Moves the map pins of directory `from` into `to` and removes `from`
/// (bpffs cannot rename directories): each map is pinned again under `to`
/// before its old pin goes, so it is never unpinned in between.
fn move_pins(from: &Path, to: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    let entries = std::fs::read_dir(from).map_err(io_err(from))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let target = to.join(&name);
        let map = MapData::from_pin(entry.path()).map_err(|e| DatapathError::Pin {
            what: format!("map {}", name.to_string_lossy()),
            path: entry.path(),
            reason: e.to_string(),
        })?;
        map.pin(&target).map_err(|e| DatapathError::Pin {
            what: format!("map {}", name.to_string_lossy()),
            path: target.clone(),
            reason: e.to_string(),
        })?;
    }
    clear(from)
}

/// A map set of another layout left by a layout change that stopped before
/// `maps` pointed at the new set (the agent died in between): carried over again.
fn interrupted(pins: &PinDir, ours: &Path) -> Option<PathBuf> {
    std::fs::read_dir(pins.root())
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p != ours
                && !p.is_symlink()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("maps-"))
                && p.join(map_names::CONFIG).exists()
        })
}

/// Points `maps` at this build's set (atomically: a new link renamed over the old one).
pub(super) fn publish(pins: &PinDir) -> Result<(), DatapathError> {
    let live = pins.live_maps();
    let tmp = pins.root().join("maps-publishing");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("maps-v{LAYOUT_VERSION}"), &tmp).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &live).map_err(io_err(&live))
}

/// Removes the pins of a map set that is not live.
fn clear(dir: &Path) -> Result<(), DatapathError> {
    let mut errors = Vec::new();
    super::pins::remove_dir(dir, &mut errors);
    errors.pop().map_or(Ok(()), Err)
}

fn open(dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    MapData::from_pin(dir.join(name))
        .and_then(Map::from_map_data)
        .map_err(map_err("open previous", name))
}

fn typed<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, DatapathError> {
    r.map_err(|e| DatapathError::Incompatible {
        reason: format!("{name}: {e}"),
    })
}

/// Entries carried over into the new maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    pub remotes: usize,
    pub vteps: usize,
    pub locals: usize,
    /// Counters added (per index) into the new map.
    pub counters: usize,
}

/// Copies remote subnets, VTEPs and local bindings from the previous set into
/// ours (`maps` of the loaded object). A map whose entries changed shape
/// cannot be converted: that is an error naming it.
pub(super) fn copy_entries(
    previous: &Previous,
    ebpf: &mut aya::Ebpf,
) -> Result<Carried, DatapathError> {
    let mut carried = copy_family::<Ipv4Addr>(previous, ebpf)?;
    // The IPv6 maps, when the previous layout had them (layout 3 on).
    if previous.dir.join(map_names6::REMOTES6).exists() {
        let v6 = copy_family::<Ipv6Addr>(previous, ebpf)?;
        carried.remotes += v6.remotes;
        carried.vteps += v6.vteps;
        carried.locals += v6.locals;
    }
    Ok(carried)
}

/// [`copy_entries`] of one family's remote subnets, VTEPs and local bindings.
fn copy_family<A: MapFamily>(
    previous: &Previous,
    ebpf: &mut aya::Ebpf,
) -> Result<Carried, DatapathError> {
    let old: LpmTrie<MapData, A::Lpm, A::Peer> = typed(
        A::REMOTES,
        LpmTrie::try_from(open(&previous.dir, A::REMOTES)?),
    )?;
    Ok(Carried {
        remotes: copy_lpm(old, ebpf, A::REMOTES)?,
        vteps: copy_hash::<A::Octets, VtepValue>(previous, ebpf, A::VTEPS)?,
        locals: copy_hash::<A::Octets, LocalEndpoint>(previous, ebpf, A::LOCAL)?,
        counters: 0,
    })
}

fn copy_lpm<K: aya::Pod, V: aya::Pod>(
    old: LpmTrie<MapData, K, V>,
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<usize, DatapathError> {
    let map = ebpf
        .map_mut(name)
        .ok_or(DatapathError::MissingMap { map: name })?;
    let mut ours: LpmTrie<&mut MapData, K, V> =
        LpmTrie::try_from(map).map_err(map_err("open", name))?;
    let mut n = 0;
    for item in old.iter() {
        let (key, value) = item.map_err(map_err("list previous", name))?;
        ours.insert(&key, value, 0)
            .map_err(map_err("carry over", name))?;
        n += 1;
    }
    Ok(n)
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(
    previous: &Previous,
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<usize, DatapathError> {
    let old: HashMap<MapData, K, V> = typed(name, HashMap::try_from(open(&previous.dir, name)?))?;
    let map = ebpf
        .map_mut(name)
        .ok_or(DatapathError::MissingMap { map: name })?;
    let mut ours: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map).map_err(map_err("open", name))?;
    let mut n = 0;
    for item in old.iter() {
        let (key, value) = item.map_err(map_err("list previous", name))?;
        ours.insert(key, value, 0)
            .map_err(map_err("carry over", name))?;
        n += 1;
    }
    Ok(n)
}

/// Adds the previous counters (per CPU, by index: layouts only append
/// counters) into ours. Run after the links were switched, so nothing counts
/// into the old map any more. The kernel has no add for a per-CPU array: a
/// packet our programs count between the read and the write of one index is
/// lost from the sum (a window of microseconds, once per upgrade).
pub(super) fn add_counters(
    previous: &Previous,
    ours: &mut PerCpuArray<&mut MapData, u64>,
) -> Result<usize, DatapathError> {
    let old: PerCpuArray<MapData, u64> = typed(
        map_names::COUNTERS,
        PerCpuArray::try_from(open(&previous.dir, map_names::COUNTERS)?),
    )?;
    let n = old.len().min(ours.len());
    for index in 0..n {
        let theirs = old
            .get(&index, 0)
            .map_err(map_err("read previous", map_names::COUNTERS))?;
        let mine = ours
            .get(&index, 0)
            .map_err(map_err("read", map_names::COUNTERS))?;
        let sum: Vec<u64> = mine.iter().zip(theirs.iter()).map(|(a, b)| a + b).collect();
        let values = PerCpuValues::try_from(sum).map_err(|e| DatapathError::Incompatible {
            reason: format!("{}: {e}", map_names::COUNTERS),
        })?;
        ours.set(index, values, 0)
            .map_err(map_err("carry over", map_names::COUNTERS))?;
    }
    Ok(n as usize)
}

/// Unpins the previous set; the maps go once no program holds them.
pub(super) fn unpin(previous: &Previous) -> Result<(), DatapathError> {
    clear(&previous.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_version_is_read_from_the_directory_name() {
        assert_eq!(version_of(Path::new("/p/maps-v2")), Some(2));
        assert_eq!(version_of(Path::new("/p/maps-v17")), Some(17));
        assert_eq!(version_of(Path::new("/p/maps")), None);
        assert_eq!(version_of(Path::new("/p/maps-unversioned")), None);
    }

    #[test]
    fn shapes_follow_the_shared_types() {
        let config = SHAPES.iter().find(|s| s.name == map_names::CONFIG).unwrap();
        assert_eq!(config.value_size, 52);
        let counters = SHAPES
            .iter()
            .find(|s| s.name == map_names::COUNTERS)
            .unwrap();
        assert_eq!(counters.max_entries, counter::COUNT);
        let config6 = SHAPES
            .iter()
            .find(|s| s.name == map_names6::CONFIG6)
            .unwrap();
        assert_eq!((config6.value_size, config6.since), (44, 3));
    }
}
