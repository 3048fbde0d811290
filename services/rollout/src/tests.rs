use super::*;

const MIN: i64 = 60_000;

fn spec(waves: Waves) -> Spec {
    Spec {
        target: "NF-200-2.4.0.img".into(),
        model: "NF-200".into(),
        version: "2.4.0".into(),
        release_counter: 8,
        sha256: "ab".repeat(32),
        length: 1000,
        filter: Filter { models: vec!["NF-200".into()], ..Filter::default() },
        waves,
        success_threshold_pct: 90,
        error_threshold_pct: 10,
        action: ActionType::Soft,
        device_timeout_ms: 60 * MIN,
        max_attempts: 2,
        health_watch_ms: 0,
        rollback_on_regression: false,
    }
}

fn devices(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            id: format!("NF-{i:03}"),
            site_id: format!("site-{}", i % 3),
            model: "NF-200".into(),
            firmware_version: "2.3.1".into(),
            tags: vec![],
        })
        .collect()
}

fn open(_: &str) -> bool {
    true
}

fn offers(d: &[Decision]) -> Vec<String> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Offer { device_id, .. } => Some(device_id.clone()),
            _ => None,
        })
        .collect()
}

fn commit_all_offered(r: &mut Rollout, now: i64) {
    let ids: Vec<String> =
        r.members.values().filter(|m| m.status == Status::Offered).map(|m| m.device_id.clone()).collect();
    for id in ids {
        r.on_report(&id, Status::Committed, "", "", now);
    }
}

#[test]
fn wave_sizes_follow_the_plan_and_add_up() {
    assert_eq!(Waves::Percent { canary: 2, steps: vec![10, 50, 100] }.sizes(100), vec![2, 10, 39, 49]);
    assert_eq!(Waves::Exponential { canary: 1, first: 2, factor: 2 }.sizes(20), vec![1, 2, 4, 8, 5]);
    assert_eq!(
        Waves::Percent { canary: 5, steps: vec![100] }.sizes(3),
        vec![3],
        "a canary larger than the fleet"
    );
    for n in [1, 7, 99, 10_000] {
        let s = Waves::Percent { canary: 10, steps: vec![1, 5, 25, 100] }.sizes(n);
        assert_eq!(s.iter().sum::<usize>(), n);
        assert!(s.iter().all(|x| *x > 0), "{s:?}");
    }
}

#[test]
fn a_healthy_rollout_goes_wave_by_wave_and_completes() {
    let mut r = Rollout::new("r1", spec(Waves::Percent { canary: 2, steps: vec![50, 100] }), &devices(20), 0)
        .unwrap();
    assert_eq!(r.waves, 3);
    let d = r.tick(0, &open);
    assert_eq!(offers(&d).len(), 2, "only the canary");
    assert!(r.tick(MIN, &open).is_empty(), "nothing new while the canary is under way");
    commit_all_offered(&mut r, MIN);
    let d = r.tick(2 * MIN, &open);
    assert!(matches!(&d[0], Decision::WaveStarted { wave: 1, devices: 9, .. }), "{d:?}");
    assert_eq!(r.tick(2 * MIN, &open).iter().filter(|d| matches!(d, Decision::Offer { .. })).count(), 9);
    commit_all_offered(&mut r, 3 * MIN);
    r.tick(3 * MIN, &open);
    let d = r.tick(3 * MIN, &open);
    assert_eq!(offers(&d).len(), 9);
    commit_all_offered(&mut r, 4 * MIN);
    let d = r.tick(4 * MIN, &open);
    assert_eq!(d, vec![Decision::Completed]);
    assert_eq!(r.state, State::Completed);
    assert_eq!(r.counts(None).get(&Status::Committed), Some(&20));
}

#[test]
fn failures_at_the_error_threshold_pause_and_no_further_wave_starts() {
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 10, steps: vec![100] }), &devices(100), 0).unwrap();
    let first = offers(&r.tick(0, &open));
    assert_eq!(first.len(), 10);
    for id in &first[..9] {
        assert!(r.on_report(id, Status::Committed, "", "", MIN).is_empty());
    }
    // 1 of 10 offered failed: 10 %, at the threshold.
    let d = r.on_report(&first[9], Status::Failed, "install_failed", "slot write: I/O error", MIN);
    assert!(
        matches!(&d[..], [Decision::Paused { reason }] if reason.contains("1 of 10 devices offered in wave 0 failed")),
        "{d:?}"
    );
    assert_eq!(r.state, State::Paused);
    for t in 2..10 {
        assert!(r.tick(t * MIN, &open).is_empty(), "paused: no offer, no wave");
    }
    assert_eq!(r.wave, 0);
    assert_eq!(r.counts(None).get(&Status::Pending), Some(&90));
    // A person resumes: the failure they saw is accepted, the wave (90 % committed)
    // succeeded, and the next starts; a new failure there pauses again.
    r.resume(14 * MIN).unwrap();
    assert!(matches!(r.tick(11 * MIN, &open).first(), Some(Decision::WaveStarted { wave: 1, .. })));
    let next = offers(&r.tick(12 * MIN, &open));
    assert_eq!(next.len(), 90);
    for id in &next[..8] {
        r.on_report(id, Status::Committed, "", "", 13 * MIN);
    }
    let d = r.on_report(&next[8], Status::RolledBack, "health_check_failed", "pump self-test", 13 * MIN);
    assert!(d.is_empty(), "1 of 90 in this wave: below 10 %");
    for id in &next[9..16] {
        r.on_report(id, Status::Refused, "wrong_model", "", 14 * MIN);
    }
    assert_eq!(r.state, State::Running, "8 of 90");
    let d = r.on_report(&next[16], Status::Failed, "install_failed", "", 14 * MIN);
    assert!(matches!(&d[..], [Decision::Paused { reason }] if reason.contains("9 of 90")), "{d:?}");
}

#[test]
fn soft_offers_wait_for_the_site_window_and_forced_ones_do_not() {
    let closed_1 = |site: &str| site != "site-1";
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 0, steps: vec![100] }), &devices(9), 0).unwrap();
    let d = offers(&r.tick(0, &closed_1));
    assert_eq!(d.len(), 6, "site-1's three devices wait");
    assert!(r.members.values().filter(|m| m.site_id == "site-1").all(|m| m.status == Status::Pending));
    let d = offers(&r.tick(MIN, &open));
    assert_eq!(d.len(), 3, "its window opened");
    let mut forced = spec(Waves::Percent { canary: 0, steps: vec![100] });
    forced.action = ActionType::Forced;
    let mut r = Rollout::new("r2", forced, &devices(9), 0).unwrap();
    assert_eq!(offers(&r.tick(0, &closed_1)).len(), 9);
}

#[test]
fn an_unanswered_offer_is_retried_then_times_out_and_counts_as_failed() {
    let mut s = spec(Waves::Percent { canary: 0, steps: vec![100] });
    s.error_threshold_pct = 100;
    let mut r = Rollout::new("r1", s, &devices(1), 0).unwrap();
    assert_eq!(offers(&r.tick(0, &open)), vec!["NF-000"]);
    r.on_report("NF-000", Status::Downloading, "", "", MIN);
    assert!(r.tick(59 * MIN, &open).is_empty());
    let d = r.tick(60 * MIN, &open);
    assert_eq!(d, vec![Decision::Offer { device_id: "NF-000".into(), attempt: 2 }]);
    let d = r.tick(120 * MIN, &open);
    assert_eq!(r.members["NF-000"].status, Status::TimedOut);
    assert!(matches!(&d[..], [Decision::Paused { .. }]), "one of one failed: {d:?}");
}

#[test]
fn a_device_enrolled_later_joins_the_wave_under_way() {
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 2, steps: vec![100] }), &devices(10), 0).unwrap();
    r.tick(0, &open);
    let late = Device {
        id: "NF-LATE".into(),
        site_id: "site-9".into(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
        tags: vec![],
    };
    assert!(r.join(&late));
    assert!(!r.join(&late), "once");
    let other = Device { model: "NF-100".into(), id: "NF-OTHER".into(), ..late.clone() };
    assert!(!r.join(&other), "filter");
    assert_eq!(offers(&r.tick(MIN, &open)), vec!["NF-LATE"]);
}

#[test]
fn the_health_gate_holds_the_next_wave_and_a_regression_pauses_with_the_evidence() {
    let mut s = spec(Waves::Percent { canary: 2, steps: vec![100] });
    s.health_watch_ms = 30 * MIN;
    let mut r = Rollout::new("r1", s.clone(), &devices(10), 0).unwrap();
    r.tick(0, &open);
    commit_all_offered(&mut r, MIN);
    assert!(r.tick(2 * MIN, &open).is_empty(), "watching");
    assert!(r.tick(31 * MIN, &open).is_empty(), "watched from the tick that saw the success");
    let d = r.tick(32 * MIN, &open);
    assert_eq!(d, vec![Decision::CheckHealth { wave: 0 }]);
    let verdict =
        Verdict { outcome: Outcome::Regressed, evidence: "encapsulation 91.2 % vs 95.8 %, p = 0.001".into() };
    let d = r.on_health(0, &verdict, 32 * MIN);
    assert!(
        matches!(&d[..], [Decision::Paused { reason }] if reason.contains("encapsulation 91.2 %")),
        "{d:?}"
    );
    assert_eq!(r.wave, 0);

    let mut r = Rollout::new("r1", s, &devices(10), 0).unwrap();
    r.tick(0, &open);
    commit_all_offered(&mut r, MIN);
    r.tick(2 * MIN, &open);
    r.tick(32 * MIN, &open);
    let d = r.on_health(0, &Verdict { outcome: Outcome::Passed, evidence: "no difference".into() }, 32 * MIN);
    assert!(matches!(&d[..], [Decision::WaveStarted { wave: 1, .. }]), "{d:?}");
    assert_eq!(r.health.len(), 1, "the evidence is kept");
}

#[test]
fn a_regression_rolls_the_updated_devices_back_to_what_each_ran_when_so_configured() {
    let mut s = spec(Waves::Percent { canary: 3, steps: vec![100] });
    s.health_watch_ms = 30 * MIN;
    s.rollback_on_regression = true;
    let mut fleet = devices(10);
    for d in fleet.iter_mut().skip(5) {
        d.firmware_version = "2.2.0".into();
    }
    let mut r = Rollout::new("r1", s, &fleet, 0).unwrap();
    r.tick(0, &open);
    commit_all_offered(&mut r, MIN);
    r.tick(2 * MIN, &open);
    assert_eq!(r.tick(32 * MIN, &open), vec![Decision::CheckHealth { wave: 0 }]);
    let verdict = Verdict { outcome: Outcome::Regressed, evidence: "size_nm +12".into() };
    let d = r.on_health(0, &verdict, 32 * MIN);
    let Some(Decision::RollBack { devices_by_version }) =
        d.iter().find(|d| matches!(d, Decision::RollBack { .. }))
    else {
        panic!("no rollback: {d:?}");
    };
    let mut updated = r.updated_devices();
    let mut offered: Vec<String> = devices_by_version.values().flatten().cloned().collect();
    updated.sort();
    offered.sort();
    assert_eq!(offered, updated, "every updated device, once");
    for (version, ids) in devices_by_version {
        for id in ids {
            let was = &fleet.iter().find(|d| &d.id == id).unwrap().firmware_version;
            assert_eq!(was, version, "{id} goes back to what it ran");
        }
    }
    assert_eq!(r.state, State::Paused);
}

#[test]
fn too_little_evidence_watches_again_then_pauses_and_a_resume_waives_the_gate() {
    let mut s = spec(Waves::Percent { canary: 2, steps: vec![100] });
    s.health_watch_ms = 30 * MIN;
    let mut r = Rollout::new("r1", s, &devices(10), 0).unwrap();
    r.tick(0, &open);
    commit_all_offered(&mut r, MIN);
    r.tick(2 * MIN, &open);
    let few = Verdict { outcome: Outcome::Insufficient, evidence: "3 batches updated, 5 needed".into() };
    let mut now = 2 * MIN;
    for watch in 1..GATE_MAX_WATCHES {
        now += 31 * MIN;
        assert_eq!(r.tick(now, &open), vec![Decision::CheckHealth { wave: 0 }], "watch {watch}");
        assert!(r.on_health(0, &few, now).is_empty(), "watched again, nothing decided");
        assert!(r.tick(now + MIN, &open).is_empty(), "a whole period again");
    }
    now += 31 * MIN;
    assert_eq!(r.tick(now, &open), vec![Decision::CheckHealth { wave: 0 }]);
    let d = r.on_health(0, &few, now);
    assert!(
        matches!(&d[..], [Decision::Paused { reason }] if reason.contains("not enough evidence")),
        "{d:?}"
    );
    assert_eq!(r.wave, 0, "no wave started without evidence");

    r.resume(now + MIN).unwrap();
    assert_eq!(r.health.last().map(|h| h.outcome), Some(Outcome::Waived));
    let d = r.tick(now + 2 * MIN, &open);
    assert!(matches!(&d[0], Decision::WaveStarted { wave: 1, .. }), "{d:?}");
}

#[test]
fn cancel_takes_out_the_waiting_and_withdraws_the_offered() {
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 2, steps: vec![100] }), &devices(10), 0).unwrap();
    r.tick(0, &open);
    let d = r.cancel("wrong build", MIN).unwrap();
    assert_eq!(d.iter().filter(|d| matches!(d, Decision::Withdraw { .. })).count(), 2);
    assert_eq!(r.counts(None).get(&Status::Cancelled), Some(&8));
    assert!(r.cancel("again", MIN).is_err());
    assert!(r.tick(2 * MIN, &open).is_empty());
}

#[test]
fn a_final_answer_is_not_overwritten_and_strangers_change_nothing() {
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 0, steps: vec![100] }), &devices(3), 0).unwrap();
    r.tick(0, &open);
    r.on_report("NF-000", Status::Committed, "", "", MIN);
    r.on_report("NF-000", Status::Downloading, "", "", 2 * MIN);
    assert_eq!(r.members["NF-000"].status, Status::Committed);
    assert!(r.on_report("NF-999", Status::Failed, "x", "y", MIN).is_empty());
    assert_eq!(r.updated_devices(), vec!["NF-000"]);
}

#[test]
fn the_order_is_the_same_after_a_restart_and_mixes_sites() {
    let r =
        Rollout::new("r1", spec(Waves::Percent { canary: 6, steps: vec![100] }), &devices(60), 0).unwrap();
    let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
    let again =
        Rollout::new("r1", spec(Waves::Percent { canary: 6, steps: vec![100] }), &devices(60), 5).unwrap();
    assert_eq!(again.members, r.members);
    let canary_sites: std::collections::BTreeSet<_> =
        r.members.values().filter(|m| m.wave == 0).map(|m| m.site_id.clone()).collect();
    assert!(canary_sites.len() >= 2, "{canary_sites:?}");
}

#[test]
fn bad_specs_name_the_field() {
    let base = spec(Waves::Percent { canary: 0, steps: vec![100] });
    let cases: Vec<(Spec, &str)> = vec![
        (Spec { success_threshold_pct: 0, ..base.clone() }, "success_threshold_pct"),
        (Spec { error_threshold_pct: 101, ..base.clone() }, "error_threshold_pct"),
        (Spec { waves: Waves::Percent { canary: 0, steps: vec![50, 40, 100] }, ..base.clone() }, "waves"),
        (Spec { waves: Waves::Percent { canary: 0, steps: vec![10, 50] }, ..base.clone() }, "waves"),
        (Spec { waves: Waves::Exponential { canary: 0, first: 1, factor: 1 }, ..base.clone() }, "factor"),
        (Spec { device_timeout_ms: 1000, ..base.clone() }, "device_timeout"),
        (Spec { max_attempts: 0, ..base.clone() }, "max_attempts"),
        (
            Spec { filter: Filter { sites: vec!["nowhere".into()], ..Filter::default() }, ..base.clone() },
            "filter",
        ),
    ];
    for (s, field) in cases {
        let e = Rollout::new("r", s, &devices(3), 0).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
}

#[test]
fn an_offer_that_could_not_be_sent_waits_for_the_device_to_come_online() {
    let mut r =
        Rollout::new("r1", spec(Waves::Percent { canary: 0, steps: vec![100] }), &devices(2), 0).unwrap();
    assert_eq!(offers(&r.tick(0, &open)).len(), 2);
    r.unsent("NF-000");
    assert_eq!(r.members["NF-000"].status, Status::Pending);
    assert!(offers(&r.tick(MIN, &open)).is_empty(), "not offered again while it is offline");
    let back = devices(1).remove(0);
    assert!(r.join(&back), "it came online");
    assert_eq!(offers(&r.tick(2 * MIN, &open)), vec!["NF-000"]);
    assert_eq!(r.members["NF-000"].attempts, 1, "the unsent offer did not count");
}

#[test]
fn a_wave_whose_devices_all_answered_below_the_success_threshold_pauses() {
    let mut s = spec(Waves::Percent { canary: 0, steps: vec![100] });
    s.error_threshold_pct = 100;
    let mut r = Rollout::new("r1", s, &devices(4), 0).unwrap();
    let ids = offers(&r.tick(0, &open));
    assert_eq!(ids.len(), 4);
    r.on_report(&ids[0], Status::Committed, "", "", MIN);
    r.on_report(&ids[1], Status::Committed, "", "", MIN);
    r.on_report(&ids[2], Status::RolledBack, "power_lost_on_trial", "", MIN);
    assert!(r.tick(2 * MIN, &open).is_empty(), "one still under way");
    r.on_report(&ids[3], Status::RolledBack, "power_lost_on_trial", "", 3 * MIN);
    let d = r.tick(4 * MIN, &open);
    assert!(
        matches!(&d[..], [Decision::Paused { reason }] if reason.contains("2 of 4 devices committed (50%)")),
        "{d:?}"
    );
    assert_eq!(r.state, State::Paused);
}
