//! Two weir hosts behind an ECMP router, each fed by its own `weir agent`
//! from the same etcd cluster (a real 3-member one), the backends reaching
//! them in other orders: their rings agree slot by slot, so when the
//! router moves one host's connections to the other (path withdrawn, or
//! XDP detached first), every one keeps echoing, also with every etcd
//! member stopped before the move (the agents keep their state). With a
//! backend joining at the moment of the move, the moved connections that
//! break are those whose ring slot changed, about the share of slots that
//! changed.

use weir_testbed::ecmp::{EcmpOptions, EcmpReport, Failover, run_ecmp};
use weir_testbed::etcd::EtcdCluster;

fn print(r: &EcmpReport) {
    // A backend joining four can take no fewer than a fifth of the slots.
    let floor = if r.failover == Failover::AddBackend {
        20.0
    } else {
        0.0
    };
    eprintln!(
        "{:?}: moved {}, survived {} (stayed {}, survived {}); slots changed {:.1}% \
         (theoretical {floor:.1}%), moved flows on a changed slot {}, broken {}; flow misses \
         on the second LB {}",
        r.failover,
        r.moved,
        r.survived,
        r.stayed,
        r.stayed_survived,
        r.slot_share * 100.0,
        r.predicted_broken,
        r.broken(),
        r.lb2_flow_misses
    );
}

#[test]
fn connections_moved_between_lbs_survive() {
    weir_testbed::require_root();
    let opts = EcmpOptions {
        instance: format!("ecmp{}", std::process::id()),
        connections: 200,
        verbose: true,
        ..EcmpOptions::default()
    };
    let mut etcd = EtcdCluster::start("ecmp").expect("etcd cluster");
    for failover in [
        Failover::Withdraw,
        Failover::Detach,
        Failover::AddBackend,
        Failover::EtcdDown,
    ] {
        let r = run_ecmp(&opts, failover, &mut etcd).expect("ECMP scenario runs");
        print(&r);
        assert!(r.ids_differ, "the LBs numbered the backends alike: {r:?}");
        assert_eq!(r.digests[0], r.digests[1], "the LBs' rings differ");
        assert_eq!(
            r.metric_digests, r.digests,
            "/metrics and `weir check` differ"
        );
        assert_eq!(r.connected, 200, "{r:?}");
        // ECMP spread them: both LBs held a fair part.
        assert!(r.moved >= 40 && r.stayed >= 40, "{r:?}");
        assert_eq!(r.stayed_survived, r.stayed, "{r:?}");
        assert!(
            r.lb2_flow_misses > 0,
            "the second LB never saw a moved flow: {r:?}"
        );
        if failover == Failover::AddBackend {
            // One backend more out of four: about a fifth of the slots.
            assert!(r.slot_share > 0.1 && r.slot_share < 0.35, "{r:?}");
            // The ring predicts which moved flows break, flow by flow.
            assert_eq!(r.broken(), r.predicted_broken, "{r:?}");
            // And the share broken is the share of slots changed, within
            // what a sample of this size allows (4 binomial sd, + 2).
            let m = r.moved as f64;
            let sd = (m * r.slot_share * (1.0 - r.slot_share)).sqrt();
            let off = (r.broken() as f64 - m * r.slot_share).abs();
            assert!(off <= 4.0 * sd + 2.0, "{r:?}");
        } else {
            assert_eq!(r.slot_share, 0.0, "{r:?}");
            assert_eq!(r.survived, r.moved, "moved connections broke: {r:?}");
        }
    }
}
