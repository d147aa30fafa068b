//! The BPF map writer: reads the registry out of the pinned maps and writes
//! individual entries. It decides nothing; `model` does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use aya::maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::util::nr_cpus;
use weir_ebpf::abi::{self, BackendHealth, BackendState, HealthReason, ServiceMode};

use super::RegistryError;
use super::model::{BackendAddr, BackendEntry, ServiceAddr, ServiceEntry, State};

const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// A read or write view of a map through mmap (BPF_F_MMAPABLE arrays).
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    /// Maps `entries` array elements of `value_size` bytes. Array elements
    /// are laid out every round_up(value_size, 8) bytes.
    fn map(
        fd: BorrowedFd<'_>,
        entries: u32,
        value_size: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        let stride = value_size.next_multiple_of(8);
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * stride).next_multiple_of(page);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a map fd; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn read<T: Copy>(&self, index: usize) -> T {
        let stride = size_of::<T>().next_multiple_of(8);
        assert!((index + 1) * stride <= self.len, "mmap read out of bounds");
        // SAFETY: in bounds (checked), array elements are 8-byte aligned, and
        // T is a plain-old-data ABI type.
        unsafe { std::ptr::read_volatile(self.ptr.add(index * stride).cast::<T>()) }
    }

    /// Element `index` of a u32 array as an atomic (the mapping is shared
    /// with the kernel and other processes).
    fn atomic_u32(&self, index: usize) -> &std::sync::atomic::AtomicU32 {
        let stride = size_of::<u32>().next_multiple_of(8);
        assert!(
            (index + 1) * stride <= self.len,
            "mmap access out of bounds"
        );
        // SAFETY: in bounds, 8-byte aligned, and only ever accessed
        // atomically by weir.
        unsafe {
            &*self
                .ptr
                .add(index * stride)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    }

    fn write<T: Copy>(&mut self, index: usize, value: T) {
        let stride = size_of::<T>().next_multiple_of(8);
        assert!((index + 1) * stride <= self.len, "mmap write out of bounds");
        // SAFETY: as in `read`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.ptr.add(index * stride).cast::<T>(), value) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn map_err(what: &'static str) -> impl Fn(aya::maps::MapError) -> RegistryError {
    move |e| RegistryError::Map(what, e.to_string())
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::ArrayOfMaps(m) => m,
        _ => unreachable!("weir only opens these map types"),
    }
}

/// Handles to an instance's pinned maps.
pub struct Maps {
    services: Map,
    rings: Map,
    backends: Map,
    flows: Map,
    config: Map,
    generation: Map,
    stats: Map,
    svc_stats: Map,
    be_stats: Map,
    backends_view: Mmap,
    l7_conns: Mmap,
}

impl Maps {
    /// Creates the balancer's maps under `dir` (pinned by name) unless they
    /// exist already. `flows` sizes the flow table of a new instance.
    pub fn create(dir: &Path, flows: u32) -> Result<(), RegistryError> {
        if abi::maps::LB.iter().all(|name| dir.join(name).exists()) {
            return Ok(());
        }
        aya::EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(abi::maps::FLOWS, flows)
            .load(weir_ebpf::lb_object())
            .map_err(|e| {
                RegistryError::Kernel(format!("creating the maps in {}: {e}", dir.display()))
            })?;
        Ok(())
    }

    /// The pinned maps [`Maps::open`] uses: what a reader of the registry
    /// depends on (an instance made by an older weir may lack others).
    pub const OPENED: &[&str] = &[
        abi::maps::SERVICES,
        abi::maps::RINGS,
        abi::maps::BACKENDS,
        abi::maps::FLOWS,
        abi::maps::CONFIG,
        abi::maps::GENERATION,
        abi::maps::STATS,
        abi::maps::SERVICE_STATS,
        abi::maps::BACKEND_STATS,
        abi::maps::L7_CONNS,
    ];

    /// Opens the pinned maps of an instance ([`Maps::OPENED`]).
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let open = |name: &str| -> Result<Map, RegistryError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| {
                RegistryError::Kernel(format!("opening pinned map {}: {e}", path.display()))
            })?;
            Map::from_map_data(data)
                .map_err(|e| RegistryError::Kernel(format!("{}: {e}", path.display())))
        };
        let backends = open(abi::maps::BACKENDS)?;
        let services = open(abi::maps::SERVICES)?;
        // An instance made by a weir with another layout (before observed
        // health, weir_backend had 20 bytes) must not be read through this
        // one's: say so instead of reading shifted fields.
        for (map, name, want) in [
            (&backends, abi::maps::BACKENDS, size_of::<abi::Backend>()),
            (&services, abi::maps::SERVICES, size_of::<abi::Service>()),
        ] {
            let have = map_data(map)
                .info()
                .map_err(|e| RegistryError::Kernel(format!("reading {name}'s info: {e}")))?
                .value_size() as usize;
            if have != want {
                return Err(RegistryError::Corrupt(format!(
                    "{} holds {have}-byte values where this weir expects {want}: the instance was \
                     made by another weir version; run the weir that made it, or `weir destroy` \
                     and recreate it",
                    dir.join(name).display()
                )));
            }
        }
        let backends_view = Mmap::map(
            map_data(&backends).fd().as_fd(),
            abi::MAX_BACKENDS,
            size_of::<abi::Backend>(),
            false,
        )
        .map_err(|e| RegistryError::Kernel(format!("mmap of {}: {e}", abi::maps::BACKENDS)))?;
        let l7 = open(abi::maps::L7_CONNS)?;
        let l7_conns = Mmap::map(
            map_data(&l7).fd().as_fd(),
            abi::MAX_BACKENDS,
            size_of::<u32>(),
            true,
        )
        .map_err(|e| RegistryError::Kernel(format!("mmap of {}: {e}", abi::maps::L7_CONNS)))?;
        Ok(Self {
            l7_conns,
            services,
            rings: open(abi::maps::RINGS)?,
            backends,
            flows: open(abi::maps::FLOWS)?,
            config: open(abi::maps::CONFIG)?,
            generation: open(abi::maps::GENERATION)?,
            stats: open(abi::maps::STATS)?,
            svc_stats: open(abi::maps::SERVICE_STATS)?,
            be_stats: open(abi::maps::BACKEND_STATS)?,
            backends_view,
        })
    }

    /// Reads the whole registry.
    pub fn read_state(&self) -> Result<State, RegistryError> {
        let mut state = State::default();
        let services: HashMap<&MapData, abi::ServiceKey, abi::Service> =
            HashMap::try_from(&self.services).map_err(map_err("weir_services"))?;
        for item in services.iter() {
            let (k, v) = item.map_err(map_err("weir_services"))?;
            let addr = ServiceAddr {
                vip: Ipv4Addr::from(k.vip),
                port: u16::from_be_bytes(k.port),
            };
            let mode = ServiceMode::from_raw(v.mode).ok_or_else(|| {
                RegistryError::Corrupt(format!("service {addr} has mode {}", v.mode))
            })?;
            state.services.insert(
                addr,
                ServiceEntry {
                    id: v.id,
                    mode: mode.into(),
                    ring_size: v.ring_size,
                    min_backends: v.min_backends,
                    max_remove_permille: v.max_remove_permille,
                    panic_permille: v.panic_permille,
                    panic: v.flags & abi::SERVICE_F_PANIC != 0,
                    panics: v.panics,
                    panic_since_ms: v.panic_since_ms,
                },
            );
        }
        for id in 0..abi::MAX_BACKENDS {
            let b: abi::Backend = self.backends_view.read(id as usize);
            let state_raw = BackendState::from_raw(b.state).ok_or_else(|| {
                RegistryError::Corrupt(format!("backend {id} has state {}", b.state))
            })?;
            if state_raw == BackendState::Empty {
                if b.flags & abi::BACKEND_F_USED != 0 {
                    state.used_free.insert(id);
                }
                continue;
            }
            let health = BackendHealth::from_raw(b.health).ok_or_else(|| {
                RegistryError::Corrupt(format!("backend {id} has health {}", b.health))
            })?;
            let health_reason = HealthReason::from_raw(b.health_reason).ok_or_else(|| {
                RegistryError::Corrupt(format!(
                    "backend {id} has health reason {}",
                    b.health_reason
                ))
            })?;
            state.backends.insert(
                id,
                BackendEntry {
                    service_id: b.service_id,
                    addr: BackendAddr {
                        addr: Ipv4Addr::from(b.addr),
                        port: u16::from_be_bytes(b.port),
                    },
                    weight: b.weight,
                    state: state_raw,
                    health,
                    health_reason,
                    health_detail: b.health_detail,
                    health_since_ms: b.health_since_ms,
                },
            );
        }
        Ok(state)
    }

    pub fn write_service(
        &mut self,
        addr: &ServiceAddr,
        entry: &ServiceEntry,
    ) -> Result<(), RegistryError> {
        let mut services: HashMap<&mut MapData, abi::ServiceKey, abi::Service> =
            HashMap::try_from(&mut self.services).map_err(map_err("weir_services"))?;
        let value = abi::Service {
            id: entry.id,
            ring_size: entry.ring_size,
            mode: ServiceMode::from(entry.mode) as u8,
            flags: if entry.panic { abi::SERVICE_F_PANIC } else { 0 },
            min_backends: entry.min_backends,
            max_remove_permille: entry.max_remove_permille,
            panic_permille: entry.panic_permille,
            panics: entry.panics,
            panic_since_ms: entry.panic_since_ms,
            ..Default::default()
        };
        services
            .insert(service_key(addr), value, 0)
            .map_err(map_err("weir_services"))
    }

    pub fn delete_service(&mut self, addr: &ServiceAddr) -> Result<(), RegistryError> {
        let mut services: HashMap<&mut MapData, abi::ServiceKey, abi::Service> =
            HashMap::try_from(&mut self.services).map_err(map_err("weir_services"))?;
        services
            .remove(&service_key(addr))
            .map_err(map_err("weir_services"))
    }

    /// Writes backend slots, all in one syscall; `None` frees a slot (kept
    /// marked as used for the quarantine).
    pub fn write_backends(
        &mut self,
        slots: &[(u32, Option<&BackendEntry>)],
    ) -> Result<(), RegistryError> {
        let (ids, values): (Vec<u32>, Vec<abi::Backend>) = slots
            .iter()
            .map(|(id, entry)| {
                let value = match entry {
                    Some(b) => abi::Backend {
                        addr: b.addr.addr.octets(),
                        port: b.addr.port.to_be_bytes(),
                        weight: b.weight,
                        service_id: b.service_id,
                        state: b.state as u32,
                        flags: abi::BACKEND_F_USED,
                        health: b.health as u8,
                        health_reason: b.health_reason as u8,
                        health_detail: b.health_detail,
                        health_since_ms: b.health_since_ms,
                    },
                    None => abi::Backend {
                        flags: abi::BACKEND_F_USED,
                        ..Default::default()
                    },
                };
                (*id, value)
            })
            .unzip();
        update_batch(map_data(&self.backends), "weir_backends", &ids, &values)
    }

    /// Zeroes backend slots' counters (one syscall) before the slots serve
    /// new backends.
    pub fn reset_backend_stats(&mut self, ids: &[u32]) -> Result<(), RegistryError> {
        let cpus = nr_cpus().map_err(|(p, e)| RegistryError::Kernel(format!("{p}: {e}")))?;
        // Per-CPU values: each key's value once per possible CPU.
        let zero = vec![abi::BackendStats::default(); ids.len() * cpus];
        update_batch(map_data(&self.be_stats), "weir_be_stats", ids, &zero)
    }

    pub fn reset_service_stats(&mut self, id: u32) -> Result<(), RegistryError> {
        let cpus = nr_cpus().map_err(|(p, e)| RegistryError::Kernel(format!("{p}: {e}")))?;
        let mut stats: PerCpuArray<&mut MapData, abi::ServiceStats> =
            PerCpuArray::try_from(&mut self.svc_stats).map_err(map_err("weir_svc_stats"))?;
        let zero = PerCpuValues::try_from(vec![abi::ServiceStats::default(); cpus])
            .map_err(|e| RegistryError::Kernel(e.to_string()))?;
        stats.set(id, zero, 0).map_err(map_err("weir_svc_stats"))
    }

    /// Builds a new table map holding `table`, filled completely through
    /// mmap before anyone can see it.
    pub fn new_ring_table(table: &[u32]) -> Result<MapData, RegistryError> {
        let map = Self::create_ring_table(table.len() as u32)?;
        Self::fill_ring_table(&map, table)?;
        Ok(map)
    }

    /// Creates a zeroed table map of `slots` slots for
    /// [`Maps::fill_ring_table`]; no packet sees it before it is swapped in.
    pub fn create_ring_table(slots: u32) -> Result<MapData, RegistryError> {
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>() as u32,
            size_of::<u32>() as u32,
            slots,
            abi::RING_MAP_FLAGS,
        );
        MapData::create(obj, "weir_ring", None).map_err(|e| {
            RegistryError::Kernel(format!("creating a ring table of {slots} slots: {e}"))
        })
    }

    /// Writes `table` into a table map of exactly its size, through mmap.
    pub fn fill_ring_table(map: &MapData, table: &[u32]) -> Result<(), RegistryError> {
        let (slots, mut view) = map_table(map, true)?;
        if slots != table.len() {
            return Err(RegistryError::Kernel(format!(
                "a table of {} slots does not fit a ring map of {slots}",
                table.len()
            )));
        }
        for (slot, id) in table.iter().enumerate() {
            view.write(slot, *id);
        }
        Ok(())
    }

    /// Swaps service `service_id`'s table for `table` with one update of the
    /// outer map. Returns the table that was there, for rollback.
    pub fn swap_ring(
        &mut self,
        service_id: u32,
        table: &MapData,
    ) -> Result<Option<MapData>, RegistryError> {
        let previous = self.ring_table(service_id)?;
        let mut rings: ArrayOfMaps<&mut MapData, MapData> =
            ArrayOfMaps::try_from(&mut self.rings).map_err(map_err("weir_rings"))?;
        rings
            .set(service_id, table, 0)
            .map_err(map_err("weir_rings"))?;
        Ok(previous)
    }

    /// The table currently installed for a service, if any.
    pub fn ring_table(&self, service_id: u32) -> Result<Option<MapData>, RegistryError> {
        let rings: ArrayOfMaps<&MapData, MapData> =
            ArrayOfMaps::try_from(&self.rings).map_err(map_err("weir_rings"))?;
        match rings.get(&service_id, 0) {
            Ok(m) => Ok(Some(m)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(None)
            }
            Err(e) => Err(RegistryError::Map("weir_rings", e.to_string())),
        }
    }

    /// Compares a service's installed table with `expected` where it lies
    /// (through mmap, no copy): `None` if no table is installed, else how
    /// many slots differ (a different length counts as differing slots).
    pub fn ring_differences(
        &self,
        service_id: u32,
        expected: &[u32],
    ) -> Result<Option<usize>, RegistryError> {
        let Some(table) = self.ring_table(service_id)? else {
            return Ok(None);
        };
        let (entries, view) = map_table(&table, false)?;
        let differ = (0..entries.min(expected.len()))
            .filter(|&i| view.read::<u32>(i) != expected[i])
            .count();
        Ok(Some(differ + entries.abs_diff(expected.len())))
    }

    /// Reads a service's installed table back (through mmap).
    pub fn read_ring(&self, service_id: u32) -> Result<Option<Vec<u32>>, RegistryError> {
        let Some(table) = self.ring_table(service_id)? else {
            return Ok(None);
        };
        read_table(&table).map(Some)
    }

    /// Backend ids that some flow in the flow table still references.
    /// Reads the table in batches (BPF_MAP_LOOKUP_BATCH); gives up with an
    /// error after `limit` rather than hold the writer lock for long.
    pub fn referenced_backends(
        &self,
        limit: std::time::Duration,
    ) -> Result<BTreeSet<u32>, RegistryError> {
        let mut out = BTreeSet::new();
        for_each_flow(map_data(&self.flows), limit, |_, id| {
            out.insert(id);
        })?;
        Ok(out)
    }

    /// Flow entries by backend id (for `weir stats` and tests).
    pub fn flows_per_backend(&self) -> Result<BTreeMap<u32, u64>, RegistryError> {
        let mut out = BTreeMap::new();
        for_each_flow(
            map_data(&self.flows),
            std::time::Duration::from_secs(30),
            |_, id| {
                *out.entry(id).or_insert(0) += 1;
            },
        )?;
        Ok(out)
    }

    pub fn generation(&self) -> Result<u64, RegistryError> {
        let generation: Array<&MapData, u64> =
            Array::try_from(&self.generation).map_err(map_err("weir_gen"))?;
        generation.get(&0, 0).map_err(map_err("weir_gen"))
    }

    /// L7 connections `weir run` holds to backend `id`.
    pub fn l7_connections(&self, id: u32) -> u32 {
        self.l7_conns
            .atomic_u32(id as usize)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds `delta` to backend `id`'s L7 connection count (shared by every
    /// process that maps it, so the atomic add is the whole protocol).
    pub fn add_l7_connections(&self, id: u32, delta: i32) {
        let counter = self.l7_conns.atomic_u32(id as usize);
        if delta >= 0 {
            counter.fetch_add(delta as u32, std::sync::atomic::Ordering::Relaxed);
        } else {
            let _ = counter.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |v| Some(v.saturating_sub(delta.unsigned_abs())),
            );
        }
    }

    /// Zeroes every L7 connection count: a starting daemon holds none.
    pub fn reset_l7_connections(&self) {
        for id in 0..abi::MAX_BACKENDS as usize {
            self.l7_conns
                .atomic_u32(id)
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A read-only view of the generation counter through mmap: one load
    /// tells a reader whether the registry changed.
    pub fn generation_watch(&self) -> Result<GenerationWatch, RegistryError> {
        let view = Mmap::map(
            map_data(&self.generation).fd().as_fd(),
            1,
            size_of::<u64>(),
            false,
        )
        .map_err(|e| RegistryError::Kernel(format!("mmap of {}: {e}", abi::maps::GENERATION)))?;
        Ok(GenerationWatch { view })
    }

    pub fn bump_generation(&mut self) -> Result<u64, RegistryError> {
        let next = self.generation()? + 1;
        let mut generation: Array<&mut MapData, u64> =
            Array::try_from(&mut self.generation).map_err(map_err("weir_gen"))?;
        generation.set(0, next, 0).map_err(map_err("weir_gen"))?;
        Ok(next)
    }

    pub fn config(&self) -> Result<abi::LbConfig, RegistryError> {
        let config: Array<&MapData, abi::LbConfig> =
            Array::try_from(&self.config).map_err(map_err("weir_config"))?;
        config.get(&0, 0).map_err(map_err("weir_config"))
    }

    pub fn set_config(&mut self, value: abi::LbConfig) -> Result<(), RegistryError> {
        let mut config: Array<&mut MapData, abi::LbConfig> =
            Array::try_from(&mut self.config).map_err(map_err("weir_config"))?;
        config.set(0, value, 0).map_err(map_err("weir_config"))
    }

    /// Global counters, summed over CPUs, in `abi::COUNTERS` order.
    pub fn counters(&self) -> Result<Vec<u64>, RegistryError> {
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(&self.stats).map_err(map_err("weir_stats"))?;
        (0..abi::COUNTERS.len() as u32)
            .map(|i| {
                Ok(stats
                    .get(&i, 0)
                    .map_err(map_err("weir_stats"))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    pub fn service_stats(&self, id: u32) -> Result<abi::ServiceStats, RegistryError> {
        let stats: PerCpuArray<&MapData, abi::ServiceStats> =
            PerCpuArray::try_from(&self.svc_stats).map_err(map_err("weir_svc_stats"))?;
        let per_cpu = stats.get(&id, 0).map_err(map_err("weir_svc_stats"))?;
        Ok(per_cpu
            .iter()
            .fold(abi::ServiceStats::default(), |mut a, s| {
                a.packets += s.packets;
                a.bytes += s.bytes;
                a.new_flows += s.new_flows;
                a.syn_repeats += s.syn_repeats;
                a.flow_misses += s.flow_misses;
                a.no_backend += s.no_backend;
                a.passed_l7 += s.passed_l7;
                a
            }))
    }

    pub fn backend_stats(&self, id: u32) -> Result<abi::BackendStats, RegistryError> {
        let stats: PerCpuArray<&MapData, abi::BackendStats> =
            PerCpuArray::try_from(&self.be_stats).map_err(map_err("weir_be_stats"))?;
        let per_cpu = stats.get(&id, 0).map_err(map_err("weir_be_stats"))?;
        Ok(per_cpu
            .iter()
            .fold(abi::BackendStats::default(), |mut a, s| {
                a.packets += s.packets;
                a.bytes += s.bytes;
                a.new_flows += s.new_flows;
                a
            }))
    }

    /// Raw access for tests that need to tamper with a map.
    #[doc(hidden)]
    pub fn backends_map_mut(&mut self) -> &mut Map {
        &mut self.backends
    }
}

/// The registry's generation counter, mapped into this process.
pub struct GenerationWatch {
    view: Mmap,
}

// SAFETY: a read-only shared mapping; reads are single aligned loads.
unsafe impl Send for GenerationWatch {}

impl GenerationWatch {
    pub fn get(&self) -> u64 {
        self.view.read::<u64>(0)
    }
}

/// `BPF_MAP_LOOKUP_BATCH` from enum bpf_cmd.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (lookup and update).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_BATCH` from enum bpf_cmd.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `values` at `keys` of an array map with one syscall, where one
/// syscall per key would cost a change of 10,000 backends milliseconds.
/// `values` is in the kernel's layout: one value per key, or, for a per-CPU
/// map, one per key and possible CPU (values a multiple of 8 bytes).
fn update_batch<V: Copy>(
    map: &MapData,
    name: &'static str,
    keys: &[u32],
    values: &[V],
) -> Result<(), RegistryError> {
    if keys.is_empty() {
        return Ok(());
    }
    let info = map.info().map_err(map_err(name))?;
    let per_cpu = matches!(info.map_type(), Ok(aya::maps::MapType::PerCpuArray));
    let per_key = if per_cpu {
        nr_cpus().map_err(|(p, e)| RegistryError::Kernel(format!("{p}: {e}")))?
    } else {
        1
    };
    if info.key_size() as usize != size_of::<u32>()
        || info.value_size() as usize != size_of::<V>()
        || (per_cpu && !size_of::<V>().is_multiple_of(8))
        || values.len() != keys.len() * per_key
    {
        return Err(RegistryError::Map(
            name,
            format!(
                "a batch of {} keys and {} values of {} bytes does not fit the map's layout",
                keys.len(),
                values.len(),
                size_of::<V>()
            ),
        ));
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel reads `count` keys and `count` values in the map's
    // layout, which the buffers were checked against above.
    unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|e| {
        RegistryError::Map(
            name,
            format!(
                "BPF_MAP_UPDATE_BATCH of {} entries ({} written): {e}",
                keys.len(),
                attr.count
            ),
        )
    })
}

/// Runs one batch command of the bpf syscall.
///
/// # Safety
/// `attr`'s buffers must hold what the command reads and have room for what
/// it writes.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the buffers; the attribute is passed
    // with its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Calls `f` for every flow entry, reading thousands per syscall. A flow
/// table of millions takes a fraction of a second this way, where one
/// syscall per key would take seconds.
fn for_each_flow(
    flows: &MapData,
    limit: std::time::Duration,
    mut f: impl FnMut(&abi::FlowKey, u32),
) -> Result<(), RegistryError> {
    let deadline = std::time::Instant::now() + limit;
    let mut chunk = 4096usize;
    let mut keys = vec![abi::FlowKey::default(); chunk];
    let mut values = vec![0u32; chunk];
    // Hash-map batches resume from an opaque bucket cursor (a u32).
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(RegistryError::Kernel(format!(
                "reading the flow table took longer than {limit:?}; not finished"
            )));
        }
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut cursor_in as *mut u64 as u64
            },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: flows.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values into
        // buffers of that many elements, and 4 bytes into `cursor_out`.
        let err = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            Some(libc::ENOSPC) if attr.count == 0 => {
                // One hash bucket holds more entries than the buffer.
                chunk *= 2;
                keys.resize(chunk, abi::FlowKey::default());
                values.resize(chunk, 0);
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => {
                return Err(RegistryError::Map(
                    "weir_flows",
                    format!("BPF_MAP_LOOKUP_BATCH: {}", err.unwrap()),
                ));
            }
        }
        for i in 0..attr.count as usize {
            f(&keys[i], values[i]);
        }
        if err.is_some() {
            return Ok(()); // ENOENT: that was the last batch
        }
        first = false;
        cursor_in = cursor_out;
    }
}

/// Reads a whole ring table through mmap.
pub fn read_table(table: &MapData) -> Result<Vec<u32>, RegistryError> {
    let (entries, view) = map_table(table, false)?;
    Ok((0..entries).map(|i| view.read::<u32>(i)).collect())
}

/// A ring table's slot count and a view of it.
fn map_table(table: &MapData, writable: bool) -> Result<(usize, Mmap), RegistryError> {
    let info = table.info().map_err(map_err("ring table"))?;
    let entries = info.max_entries();
    let view = Mmap::map(table.fd().as_fd(), entries, size_of::<u32>(), writable)
        .map_err(|e| RegistryError::Kernel(format!("mmap of a ring table: {e}")))?;
    Ok((entries as usize, view))
}

pub fn service_key(addr: &ServiceAddr) -> abi::ServiceKey {
    abi::ServiceKey {
        vip: addr.vip.octets(),
        port: addr.port.to_be_bytes(),
        proto: abi::PROTO_TCP,
        pad: 0,
    }
}
