//! The L7 workers' view of the registry, against real pinned maps: weighted
//! power-of-two choices, exclusions, changes seen through the generation
//! counter, and what observed health does to new and live connections.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use common::{TestInstance, add_service, require_root};
use weir::l7::view::RegistryView;
use weir::registry::{
    ApplyOptions, BackendAddr, Change, HealthUpdate, Maps, ServiceAddr, ServiceModeName,
};
use weir_ebpf::abi::{BackendHealth, HealthReason};

fn svc() -> ServiceAddr {
    ServiceAddr {
        vip: Ipv4Addr::new(198, 19, 0, 40),
        port: 8080,
    }
}

fn be(i: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(127, 0, 0, 1),
        port: 9000 + i as u16,
    }
}

/// A cheap deterministic generator for the two draws.
fn draws(n: u32) -> impl Iterator<Item = [u32; 2]> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        [x as u32, (x >> 32) as u32]
    })
}

#[test]
fn picks_follow_weights_load_and_changes() {
    require_root();
    let inst = TestInstance::new("view");
    let mut reg = inst.registry();
    let opts = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    reg.apply(&add_service(svc(), ServiceModeName::L7), opts())
        .unwrap();
    let set = vec![(be(1), 1), (be(2), 1), (be(3), 2)];
    reg.apply(
        &Change::SetBackends {
            service: svc(),
            backends: set,
        },
        opts(),
    )
    .unwrap();
    let mut view = RegistryView::open(
        Maps::open(&inst.instance.pin_dir()).unwrap(),
        BTreeSet::new(),
    )
    .unwrap();
    assert!(view.has_service(&svc()));
    assert_eq!(view.refresh().unwrap(), None, "nothing changed");

    // Equal load: choices follow the weights 1:1:2.
    let mut count: BTreeMap<u16, u32> = BTreeMap::new();
    for r in draws(8000) {
        let (_, addr) = view.pick(&svc(), r, &[], |_| 0, |_| false).unwrap();
        *count.entry(addr.port()).or_default() += 1;
    }
    let share = |p: u16| count[&p] as f64 / 8000.0;
    assert!((share(9003) - 0.5).abs() < 0.03, "{count:?}");
    assert!((share(9001) - 0.25).abs() < 0.03, "{count:?}");

    // Live connections weigh: a loaded backend is chosen far less.
    let id_of = |port: u16, v: &RegistryView| {
        (0..3)
            .find(|id| v.backend(*id).unwrap().addr.port() == port)
            .unwrap()
    };
    let loaded = id_of(9003, &view);
    let mut to_loaded = 0;
    for r in draws(4000) {
        let (id, _) = view
            .pick(
                &svc(),
                r,
                &[],
                |id| if id == loaded { 1000 } else { 1 },
                |_| false,
            )
            .unwrap();
        to_loaded += u32::from(id == loaded);
    }
    assert!(
        to_loaded < 4000 / 4,
        "{to_loaded} of 4000 went to the loaded backend"
    );

    // Exclusions (a failed connect) are skipped.
    let first = id_of(9001, &view);
    for r in draws(500) {
        let (id, _) = view.pick(&svc(), r, &[first], |_| 0, |_| false).unwrap();
        assert_ne!(id, first);
    }

    // Ejected backends are passed over while another is usable.
    assert_eq!(view.active_backends(&svc()), 3);
    for r in draws(500) {
        let (id, _) = view.pick(&svc(), r, &[], |_| 0, |id| id == first).unwrap();
        assert_ne!(id, first);
    }
    // When every usable one is ejected, the ring is as it is: ejection
    // alone never refuses a client.
    let mut seen = std::collections::BTreeSet::new();
    for r in draws(500) {
        let (id, _) = view.pick(&svc(), r, &[], |_| 0, |_| true).unwrap();
        seen.insert(id);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let others: Vec<u32> = (0..3).filter(|id| *id != first).collect();
    for r in draws(100) {
        let (id, _) = view
            .pick(&svc(), r, &others, |_| 0, |id| id == first)
            .unwrap();
        assert_eq!(
            id, first,
            "the only one left untried is tried, ejected or not"
        );
    }

    // A drain is seen through the generation and never picked again.
    reg.apply(
        &Change::DrainBackend {
            service: svc(),
            backend: be(3),
        },
        opts(),
    )
    .unwrap();
    let changes = view.refresh().unwrap().expect("generation moved");
    assert_eq!(changes.stopped.into_iter().collect::<Vec<_>>(), [loaded]);
    assert_eq!(view.active_backends(&svc()), 2);
    for r in draws(2000) {
        let (id, _) = view.pick(&svc(), r, &[], |_| 0, |_| false).unwrap();
        assert_ne!(id, loaded);
    }
    // All gone: no backend (503).
    let remaining: Vec<u32> = (0..3).filter(|id| *id != loaded).collect();
    assert!(
        view.pick(&svc(), [1, 2], &remaining, |_| 0, |_| false)
            .is_none()
    );
    reg.apply(
        &Change::SetBackends {
            service: svc(),
            backends: vec![],
        },
        opts(),
    )
    .unwrap();
    view.refresh().unwrap().unwrap();
    assert!(view.pick(&svc(), [1, 2], &[], |_| 0, |_| false).is_none());
    // L4 services are not the workers' business.
    let l4 = ServiceAddr {
        vip: Ipv4Addr::new(198, 19, 0, 41),
        port: 80,
    };
    reg.apply(&add_service(l4, ServiceModeName::L4), opts())
        .unwrap();
    view.refresh().unwrap();
    assert!(!view.has_service(&l4));
}

#[test]
fn unhealthy_backends_get_no_new_connections_and_are_drained_only_where_asked() {
    require_root();
    let inst = TestInstance::new("viewhealth");
    let mut reg = inst.registry();
    reg.apply(
        &add_service(svc(), ServiceModeName::L7),
        ApplyOptions::default(),
    )
    .unwrap();
    let set = (1..=4).map(|i| (be(i), 1)).collect();
    reg.apply(
        &Change::SetBackends {
            service: svc(),
            backends: set,
        },
        ApplyOptions::default(),
    )
    .unwrap();
    let open = |drain: bool| {
        let services = if drain {
            BTreeSet::from([svc()])
        } else {
            BTreeSet::new()
        };
        RegistryView::open(Maps::open(&inst.instance.pin_dir()).unwrap(), services).unwrap()
    };
    let (mut keep, mut drain) = (open(false), open(true));
    let id_of = |port: u16, v: &RegistryView| {
        (0..4)
            .find(|id| v.backend(*id).unwrap().addr.port() == port)
            .unwrap()
    };
    let mark = |reg: &mut weir::registry::Registry, i: &[u8], health| {
        let updates = i
            .iter()
            .map(|&i| HealthUpdate {
                service: svc(),
                backend: be(i),
                health,
                reason: HealthReason::Refused,
                detail: 111,
                at_ms: 1,
            })
            .collect();
        reg.apply(
            &Change::SetHealth { updates },
            ApplyOptions {
                command: "test agent".into(),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let sick = id_of(9001, &keep);
    mark(&mut reg, &[1], BackendHealth::Unhealthy);
    let kept = keep.refresh().unwrap().expect("generation moved");
    assert!(kept.stopped.is_empty(), "live connections stay by default");
    let drained = drain.refresh().unwrap().expect("generation moved");
    assert_eq!(drained.stopped, BTreeSet::from([sick]), "drain_unhealthy");
    // A reload that turns drain_unhealthy on drains what is unhealthy
    // already, at the next refresh, though the registry did not move.
    let mut reloaded = open(false);
    assert!(reloaded.refresh().unwrap().is_none());
    reloaded.set_drain_unhealthy(BTreeSet::from([svc()]));
    let now_drained = reloaded.refresh().unwrap().expect("read again");
    assert_eq!(now_drained.stopped, BTreeSet::from([sick]));
    for view in [&keep, &drain] {
        for r in draws(1000) {
            let (id, _) = view.pick(&svc(), r, &[], |_| 0, |_| false).unwrap();
            assert_ne!(id, sick, "no new connection to an unhealthy backend");
        }
    }

    // Panic: three of four unhealthy, all four serve again; nothing more
    // is drained, and the sick one takes new connections.
    let outcome = mark(&mut reg, &[2, 3], BackendHealth::Unhealthy);
    assert!(
        outcome.diff.iter().any(|d| d
            .to_string()
            .contains("panics: 1 of 4 active backends healthy")),
        "{:?}",
        outcome.diff
    );
    assert!(keep.refresh().unwrap().unwrap().stopped.is_empty());
    assert!(drain.refresh().unwrap().unwrap().stopped.is_empty());
    let picked: BTreeSet<u32> = draws(1000)
        .map(|r| keep.pick(&svc(), r, &[], |_| 0, |_| false).unwrap().0)
        .collect();
    assert_eq!(picked.len(), 4, "in panic every active backend serves");
    let state = reg.state().unwrap();
    let entry = state.service(&svc()).unwrap();
    assert!(entry.panic && entry.panics == 1 && entry.panic_since_ms > 0);
    reg.check().unwrap();
}

/// A re-read that fails leaves the view on its last good state, and the
/// next good one still reports what stopped meanwhile (a drain is never
/// lost to a failed refresh).
#[test]
fn a_failed_refresh_loses_no_drain() {
    require_root();
    let inst = TestInstance::new("viewfail");
    let mut reg = inst.registry();
    reg.apply(
        &add_service(svc(), ServiceModeName::L7),
        ApplyOptions::default(),
    )
    .unwrap();
    let set = (1..=3).map(|i| (be(i), 1)).collect();
    reg.apply(
        &Change::SetBackends {
            service: svc(),
            backends: set,
        },
        ApplyOptions::default(),
    )
    .unwrap();
    let mut view = RegistryView::open(
        Maps::open(&inst.instance.pin_dir()).unwrap(),
        BTreeSet::new(),
    )
    .unwrap();
    let drained = (0..3)
        .find(|id| view.backend(*id).unwrap().addr.port() == 9002)
        .unwrap();
    reg.apply(
        &Change::DrainBackend {
            service: svc(),
            backend: be(2),
        },
        ApplyOptions::default(),
    )
    .unwrap();
    // A slot nobody uses reads as corrupt: the next re-read fails.
    let pin = inst.instance.pin_dir().join(weir_ebpf::abi::maps::BACKENDS);
    let mut slots: aya::maps::Array<_, weir_ebpf::abi::Backend> = aya::maps::Array::try_from(
        aya::maps::Map::Array(aya::maps::MapData::from_pin(&pin).unwrap()),
    )
    .unwrap();
    let bad = weir_ebpf::abi::Backend {
        state: 9,
        ..Default::default()
    };
    slots.set(100, bad, 0).unwrap();
    assert!(view.refresh().is_err(), "a corrupt slot fails the re-read");
    assert!(
        view.pick(&svc(), [1, 2], &[], |_| 0, |_| false).is_some(),
        "still routing on the last good state"
    );
    slots
        .set(100, weir_ebpf::abi::Backend::default(), 0)
        .unwrap();
    let changes = view.refresh().unwrap().expect("generation moved");
    assert_eq!(changes.stopped, BTreeSet::from([drained]));
}
