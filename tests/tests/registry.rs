//! The registry against real pinned maps: writers serialize, refused
//! changes change nothing, read-back mismatches are errors and roll back,
//! removed backends are freed only once no flow uses them, new backends
//! start with zero counters, a ring that reads back wrong is refused, a
//! large ring is installed as built.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use common::{TestInstance, require_root};
use weir::registry::{
    ApplyOptions, BackendAddr, Change, Registry, RegistryError, ServiceAddr, ServiceModeName,
};
use weir_ebpf::abi::{self, BackendState};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);

fn svc() -> ServiceAddr {
    ServiceAddr {
        vip: VIP,
        port: 443,
    }
}

fn backend(i: u32) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 40, 0)) + i),
        port: 443,
    }
}

fn small() -> ServiceAddr {
    ServiceAddr {
        vip: VIP,
        port: 444,
    }
}

fn small_backend(i: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(198, 18, 41, i + 1),
        port: 444,
    }
}

/// Whether an error is the expected kind.
type ErrorCheck = fn(&RegistryError) -> bool;

fn opts() -> ApplyOptions {
    ApplyOptions {
        command: "test".into(),
        ..Default::default()
    }
}

fn add_service(reg: &mut Registry) {
    let change = Change::AddService {
        addr: svc(),
        mode: ServiceModeName::L4,
        ring_size: None,
        max_remove_fraction: None,
        min_backends: Some(2),
        panic_threshold: None,
    };
    reg.apply(&change, opts()).unwrap();
}

/// Backends 0..n, weight 1, as the whole set of the service.
fn set_backends(reg: &mut Registry, n: u32) {
    let backends = (0..n).map(|i| (backend(i), 1)).collect();
    reg.apply(
        &Change::SetBackends {
            service: svc(),
            backends,
        },
        opts(),
    )
    .unwrap();
}

/// Puts a flow naming backend slot `id` into the flow table, as the XDP
/// program would; returns its key.
fn set_flow(inst: &TestInstance, id: u32) -> abi::FlowKey {
    let path = inst.instance.pin_dir().join(abi::maps::FLOWS);
    let mut map = Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap();
    let mut flows: HashMap<&mut MapData, abi::FlowKey, u32> = HashMap::try_from(&mut map).unwrap();
    let key = abi::FlowKey {
        saddr: [198, 18, 1, 2],
        daddr: VIP.octets(),
        sport: (id as u16).to_be_bytes(),
        dport: 443u16.to_be_bytes(),
        proto: 6,
        pad: [0; 3],
    };
    flows.insert(key, id, 0).unwrap();
    key
}

/// Deletes a flow, as LRU eviction would.
fn drop_flow(inst: &TestInstance, key: &abi::FlowKey) {
    let path = inst.instance.pin_dir().join(abi::maps::FLOWS);
    let mut map = Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap();
    let mut flows: HashMap<&mut MapData, abi::FlowKey, u32> = HashMap::try_from(&mut map).unwrap();
    flows.remove(key).unwrap();
}

/// Everything an observer can see: state, rings, generation, audit log.
type Observed = (weir::registry::State, Vec<Option<Vec<u32>>>, u64, String);

fn observe(reg: &Registry) -> Observed {
    let state = reg.state().unwrap();
    let rings = state
        .services
        .values()
        .map(|s| reg.maps().read_ring(s.id).unwrap())
        .collect();
    let audit = std::fs::read_to_string(reg.instance().audit_log()).unwrap_or_default();
    (state, rings, reg.maps().generation().unwrap(), audit)
}

/// Applies `change` with `tamper` run between the writes and the read-back;
/// checks the read-back refused it and left the rings, the generation and
/// the audit log as in `before`. Returns the error.
fn refused_by_the_read_back(
    reg: &mut Registry,
    change: Change,
    tamper: weir::registry::VerifyHook,
    before: &Observed,
) -> RegistryError {
    let err = reg
        .apply(
            &change,
            ApplyOptions {
                before_verify: Some(tamper),
                ..opts()
            },
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::ReadBack(_)), "got {err}");
    let (_, rings, generation, audit) = observe(reg);
    assert!(rings == before.1, "rings rolled back");
    assert_eq!(generation, before.2, "no generation bump");
    assert_eq!(audit, before.3, "no audit line");
    err
}

#[test]
fn concurrent_writers_serialize() {
    require_root();
    let inst = TestInstance::new("conc");
    let mut reg = inst.registry();
    add_service(&mut reg);
    let start = reg.maps().generation().unwrap();

    // Eight processes and eight threads add a backend each, all at once.
    let weir = weir_testbed::workspace_bin("weir");
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(&weir)
                .args([
                    "--instance",
                    inst.name(),
                    "backend",
                    "add",
                    &svc().to_string(),
                    &backend(i).to_string(),
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn weir")
        })
        .collect();
    let threads: Vec<_> = (8..16)
        .map(|i| {
            let instance = inst.instance.clone();
            std::thread::spawn(move || {
                let mut reg = Registry::open(&instance).unwrap();
                let change = Change::AddBackend {
                    service: svc(),
                    backend: backend(i),
                    weight: 1,
                };
                reg.apply(&change, opts()).unwrap();
            })
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for t in threads {
        t.join().unwrap();
    }

    let state = reg.state().unwrap();
    let ids: Vec<u32> = state.backends.keys().copied().collect();
    assert_eq!(
        ids,
        (0..16).collect::<Vec<_>>(),
        "16 distinct slots, none lost or shared"
    );
    assert_eq!(
        reg.maps().generation().unwrap(),
        start + 16,
        "one generation per change"
    );
    let audit = std::fs::read_to_string(reg.instance().audit_log()).unwrap();
    let generations: Vec<u64> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["generation"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        generations,
        (1..=start + 16).collect::<Vec<_>>(),
        "audit lines whole and in order"
    );
    reg.check().expect("rings match the backends");
}

#[test]
fn refused_changes_change_nothing() {
    require_root();
    let inst = TestInstance::new("refuse");
    let mut reg = inst.registry();
    add_service(&mut reg);
    set_backends(&mut reg, 4);
    let change = Change::AddService {
        addr: small(),
        mode: ServiceModeName::L4,
        ring_size: Some(251),
        max_remove_fraction: Some(0.5),
        min_backends: Some(2),
        panic_threshold: None,
    };
    reg.apply(&change, opts()).unwrap();
    let set = vec![(small_backend(0), 1), (small_backend(1), 1)];
    reg.apply(
        &Change::SetBackends {
            service: small(),
            backends: set,
        },
        opts(),
    )
    .unwrap();
    // A removed backend that a collect would free: its flow kept it when
    // it was removed, and has gone since.
    let flow = set_flow(&inst, 3);
    reg.apply(
        &Change::RemoveBackend {
            service: svc(),
            backend: backend(3),
        },
        opts(),
    )
    .unwrap();
    drop_flow(&inst, &flow);
    assert_eq!(
        reg.state().unwrap().backends[&3].state,
        BackendState::Removed
    );
    let before = observe(&reg);

    let refused: Vec<(Change, ErrorCheck)> = vec![
        // Guard rail: 3 of 4 at once.
        (
            Change::SetBackends {
                service: svc(),
                backends: vec![(backend(0), 1)],
            },
            |e| matches!(e, RegistryError::Guard(_)),
        ),
        // Guard rail: 1 of 2 is within the fraction but below min_backends (2).
        (
            Change::DrainBackend {
                service: small(),
                backend: small_backend(0),
            },
            |e| matches!(e, RegistryError::Guard(m) if m.contains("minimum 2")),
        ),
        (
            Change::SetBackends {
                service: svc(),
                backends: vec![(backend(0), 1), (backend(0), 2)],
            },
            |e| matches!(e, RegistryError::DuplicateBackend(..)),
        ),
        (
            Change::AddBackend {
                service: svc(),
                backend: backend(0),
                weight: 1,
            },
            |e| matches!(e, RegistryError::DuplicateBackend(..)),
        ),
        (
            Change::AddBackend {
                service: svc(),
                backend: BackendAddr {
                    addr: backend(9).addr,
                    port: 80,
                },
                weight: 1,
            },
            |e| matches!(e, RegistryError::Invalid(_)),
        ),
        (
            Change::AddBackend {
                service: ServiceAddr { vip: VIP, port: 1 },
                backend: backend(9),
                weight: 1,
            },
            |e| matches!(e, RegistryError::UnknownService(_)),
        ),
        (
            Change::DrainBackend {
                service: svc(),
                backend: backend(9),
            },
            |e| matches!(e, RegistryError::UnknownBackend(..)),
        ),
        (
            Change::SetWeight {
                service: svc(),
                backend: backend(1),
                weight: 0,
            },
            |e| matches!(e, RegistryError::Invalid(_)),
        ),
        (
            Change::AddService {
                addr: svc(),
                mode: ServiceModeName::L4,
                ring_size: None,
                max_remove_fraction: None,
                min_backends: None,
                panic_threshold: None,
            },
            |e| matches!(e, RegistryError::ServiceExists(_)),
        ),
        (
            Change::AddService {
                addr: ServiceAddr {
                    vip: VIP,
                    port: 445,
                },
                mode: ServiceModeName::L4,
                ring_size: Some(65536),
                max_remove_fraction: None,
                min_backends: None,
                panic_threshold: None,
            },
            |e| matches!(e, RegistryError::Invalid(_)),
        ),
        (Change::RemoveService { addr: svc() }, |e| {
            matches!(e, RegistryError::Guard(_))
        }),
    ];
    for (change, expected) in refused {
        let err = reg
            .apply(&change, opts())
            .expect_err(&format!("{change:?} should be refused"));
        assert!(expected(&err), "{change:?}: unexpected error {err}");
        assert_eq!(observe(&reg), before, "{change:?} changed something");
    }

    // With --force the guard rail yields.
    let forced = reg
        .apply(
            &Change::SetBackends {
                service: svc(),
                backends: vec![(backend(0), 1)],
            },
            ApplyOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();
    assert!(forced.applied);
    // Dry runs report and write nothing.
    let after_force = observe(&reg);
    let dry = reg
        .apply(
            &Change::SetBackends {
                service: svc(),
                backends: vec![(backend(5), 1), (backend(6), 1)],
            },
            ApplyOptions {
                dry_run: true,
                force: true,
                ..opts()
            },
        )
        .unwrap();
    assert!(!dry.applied && !dry.diff.is_empty());
    assert_eq!(observe(&reg), after_force);
}

#[test]
fn read_back_mismatch_is_an_error_and_rolls_back() {
    require_root();
    let inst = TestInstance::new("verify");
    let mut reg = inst.registry();
    add_service(&mut reg);
    set_backends(&mut reg, 3);
    let before = observe(&reg);

    // Something else scribbles on slot 1 between our writes and the check.
    let tamper: weir::registry::VerifyHook = Box::new(|maps| {
        let mut backends: Array<&mut MapData, abi::Backend> =
            Array::try_from(maps.backends_map_mut()).unwrap();
        let mut b = backends.get(&1, 0).unwrap();
        b.weight = 77;
        backends.set(1, b, 0).unwrap();
    });
    let change = Change::AddBackend {
        service: svc(),
        backend: backend(3),
        weight: 2,
    };
    let err = refused_by_the_read_back(&mut reg, change, tamper, &before);
    assert!(
        err.to_string().contains("slot 1"),
        "names what differs: {err}"
    );

    let state = reg.state().unwrap();
    assert!(
        !state.backends.values().any(|b| b.addr == backend(3)),
        "new backend rolled back"
    );
    // Our writes are undone; the scribble is not ours to undo, and `check`
    // still sees it: slot 1's weight no longer matches the ring.
    assert_eq!(state.backends[&1].weight, 77);
    assert!(matches!(reg.check(), Err(RegistryError::ReadBack(_))));
    reg.apply(
        &Change::SetWeight {
            service: svc(),
            backend: backend(1),
            weight: 1,
        },
        opts(),
    )
    .unwrap();
    reg.check()
        .expect("consistent once repaired through the API");
}

#[test]
fn removed_backends_are_freed_only_without_flows() {
    require_root();
    let inst = TestInstance::new("gc");
    let mut reg = inst.registry();
    add_service(&mut reg);
    set_backends(&mut reg, 4);

    // A live flow on backend 1 (slot 1).
    let _flow = set_flow(&inst, 1);
    reg.apply(
        &Change::RemoveBackend {
            service: svc(),
            backend: backend(1),
        },
        opts(),
    )
    .unwrap();
    reg.apply(
        &Change::RemoveBackend {
            service: svc(),
            backend: backend(2),
        },
        opts(),
    )
    .unwrap();

    // The next change collects: slot 2 (no flows) is freed, slot 1 stays.
    reg.apply(
        &Change::SetWeight {
            service: svc(),
            backend: backend(0),
            weight: 3,
        },
        opts(),
    )
    .unwrap();
    let state = reg.state().unwrap();
    assert_eq!(
        state.backends[&1].state,
        BackendState::Removed,
        "still carries a flow"
    );
    assert!(!state.backends.contains_key(&2), "freed");
    assert!(state.used_free.contains(&2), "quarantined as used");

    // New backends take never-used slots, not the quarantined one.
    reg.apply(
        &Change::AddBackend {
            service: svc(),
            backend: backend(7),
            weight: 1,
        },
        opts(),
    )
    .unwrap();
    let state = reg.state().unwrap();
    let id = state
        .backends
        .iter()
        .find(|(_, b)| b.addr == backend(7))
        .map(|(id, _)| *id)
        .unwrap();
    assert_eq!(id, 4);
    reg.check().unwrap();
}

#[test]
fn new_backends_start_with_zero_counters() {
    require_root();
    let inst = TestInstance::new("fresh");
    let mut reg = inst.registry();
    add_service(&mut reg);

    // Leftover counters on every CPU of slots 0..4, as a previous user of
    // the slots would have left them.
    let path = inst.instance.pin_dir().join(abi::maps::BACKEND_STATS);
    let mut map = Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap();
    let mut stats: PerCpuArray<&mut MapData, abi::BackendStats> =
        PerCpuArray::try_from(&mut map).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for id in 0..4 {
        let stale = abi::BackendStats {
            packets: 7,
            bytes: 700,
            new_flows: 1,
        };
        stats
            .set(id, PerCpuValues::try_from(vec![stale; cpus]).unwrap(), 0)
            .unwrap();
    }

    // Three new backends take slots 0..3, which start from zero; slot 3 is
    // not handed out and keeps what it had.
    set_backends(&mut reg, 3);
    for id in 0..3 {
        assert_eq!(
            reg.maps().backend_stats(id).unwrap(),
            abi::BackendStats::default(),
            "slot {id}"
        );
    }
    assert_eq!(
        reg.maps().backend_stats(3).unwrap().packets,
        7 * cpus as u64
    );
}

#[test]
fn a_ring_that_reads_back_wrong_is_an_error_and_rolls_back() {
    require_root();
    let inst = TestInstance::new("ringcheck");
    let mut reg = inst.registry();
    add_service(&mut reg);
    set_backends(&mut reg, 3);
    let before = observe(&reg);
    let id = reg.state().unwrap().service(&svc()).unwrap().id;

    // Something else scribbles on one slot of the new table once it is
    // installed.
    let tamper: weir::registry::VerifyHook = Box::new(move |maps| {
        let table = maps.ring_table(id).unwrap().unwrap();
        let mut map = Map::from_map_data(table).unwrap();
        let mut ring: Array<&mut MapData, u32> = Array::try_from(&mut map).unwrap();
        let owner = ring.get(&5, 0).unwrap();
        ring.set(5, owner ^ 1, 0).unwrap();
    });
    let change = Change::AddBackend {
        service: svc(),
        backend: backend(3),
        weight: 1,
    };
    let err = refused_by_the_read_back(&mut reg, change, tamper, &before);
    assert!(
        err.to_string().contains("1 of 65537 slots differ"),
        "says how much differs: {err}"
    );
    assert_eq!(
        reg.state().unwrap().backends,
        before.0.backends,
        "new backend rolled back"
    );
    reg.check().unwrap();
}

#[test]
fn a_large_ring_is_built_installed_and_read_back() {
    require_root();
    let inst = TestInstance::new("bigring");
    let mut reg = inst.registry();
    // Large enough that its map is created on a second thread while the
    // table builds.
    let big = ServiceAddr {
        vip: VIP,
        port: 445,
    };
    let service = |reg: &mut Registry, change: Change| reg.apply(&change, opts()).unwrap();
    service(
        &mut reg,
        Change::AddService {
            addr: big,
            mode: ServiceModeName::L4,
            ring_size: Some(524_287),
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        },
    );
    let backends = (0..3)
        .map(|i| {
            let b = BackendAddr {
                addr: backend(i).addr,
                port: 445,
            };
            (b, 1)
        })
        .collect();
    service(
        &mut reg,
        Change::SetBackends {
            service: big,
            backends,
        },
    );
    let state = reg.state().unwrap();
    let id = state.service(&big).unwrap().id;
    let ring = reg.maps().read_ring(id).unwrap().unwrap();
    assert_eq!(ring.len(), 524_287);
    assert!(
        ring == state.ring_for(state.service(&big).unwrap()).unwrap(),
        "installed as built"
    );
    reg.check().unwrap();
}

/// An instance whose backend table has another value layout (as one made
/// by a weir from before observed health, 20-byte backends) is refused
/// with what to run, never read through this weir's layout.
#[test]
fn an_instance_of_another_layout_is_refused_not_misread() {
    require_root();
    let inst = TestInstance::new("layout");
    {
        let mut reg = inst.registry();
        add_service(&mut reg);
    }
    let pin = inst.instance.pin_dir().join(abi::maps::BACKENDS);
    std::fs::remove_file(&pin).unwrap();
    let old = aya_obj::Map::new_from_params(2, 4, 20, abi::MAX_BACKENDS, abi::BPF_F_MMAPABLE);
    let map = MapData::create(old, "weir_backends", None).unwrap();
    map.pin(&pin).unwrap();
    let err = match weir::registry::Registry::open(&inst.instance) {
        Ok(_) => panic!("a 20-byte backend table was opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("holds 20-byte values where this weir expects 32")
            && err.contains("weir destroy"),
        "{err}"
    );
}
