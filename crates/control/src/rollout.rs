//! Which version each node's feed is to bring it to, and the canary rollout
//! (`serve --canary`): a write is first the canaries' (the candidate); once
//! every canary has polled from it, refused none of its domains, runs its
//! xDS, and stayed within the 5xx and failover limits for the bake, it
//! becomes the stable version every node gets. Otherwise the rollout holds
//! and the canaries are sent the stable version again (the feed's pages go
//! backwards as well as forwards). The stable version is kept in the store.

use crate::admin;
use crate::ads::short_type;
use crate::api::Api;
use crate::error::ControlError;
use crate::table::CURSOR_BIT;
use origin_policy_xds::AdsServer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The canaries and the limits they are judged by.
#[derive(Debug, Clone)]
pub struct RolloutConfig {
    pub canaries: Vec<String>,
    pub bake: Duration,
    /// `http.viewer.downstream_rq_5xx` / `downstream_rq_completed`, at most.
    pub max_5xx_rate: f64,
    /// The failover counter / `downstream_rq_completed`, at most.
    pub max_failover_rate: f64,
    pub failover_counter: String,
    /// Requests a canary must have seen before its rates are judged.
    pub min_requests: u64,
    /// How long the canaries have to take a candidate.
    pub ack_timeout: Duration,
}

const COMPLETED: &str = "http.viewer.downstream_rq_completed";
const SERVER_ERRORS: &str = "http.viewer.downstream_rq_5xx";
/// How often the rollout looks at the canaries.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Every node has the latest version.
    Stable,
    /// The canaries have the candidate; waiting for them to take it.
    Canary,
    /// The canaries run the candidate; their counters are watched.
    Baking,
    /// The candidate was refused; the canaries are back on the stable version.
    Held,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Stable => "stable",
            Stage::Canary => "canary",
            Stage::Baking => "baking",
            Stage::Held => "held",
        }
    }
}

#[derive(Debug, Clone)]
struct State {
    stable: u64,
    stage: Stage,
    candidate: Option<u64>,
    reason: Option<String>,
    /// When the candidate was sent, and when its bake began.
    sent_at: Option<Instant>,
    baking_since: Option<Instant>,
    /// Per canary: its admin address and counters when the bake began.
    baseline: HashMap<String, (String, [u64; 3])>,
    promoted: u64,
    held: u64,
}

/// Every node's feed target, its feed's progress, and the rollout.
pub struct Fleet {
    pub rollout: Option<RolloutConfig>,
    state: Mutex<State>,
    /// Per node: the epoch and version of its last poll.
    polls: Mutex<HashMap<String, (Option<u64>, u64)>>,
    epoch: AtomicU64,
    ads: OnceLock<AdsServer>,
}

impl Fleet {
    pub fn new(rollout: Option<RolloutConfig>) -> Self {
        Fleet {
            rollout,
            state: Mutex::new(State {
                stable: 0,
                stage: Stage::Stable,
                candidate: None,
                reason: None,
                sent_at: None,
                baking_since: None,
                baseline: HashMap::new(),
                promoted: 0,
                held: 0,
            }),
            polls: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            ads: OnceLock::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn polls(&self) -> MutexGuard<'_, HashMap<String, (Option<u64>, u64)>> {
        self.polls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The store's epoch and stable version, at start.
    pub fn start(&self, epoch: u64, stable: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
        self.state().stable = stable;
    }

    /// The ADS server whose per-node targets depend on the feed's progress.
    pub fn set_ads(&self, ads: AdsServer) {
        let _ = self.ads.set(ads);
    }

    pub fn ads(&self) -> Option<&AdsServer> {
        self.ads.get()
    }

    pub fn stable(&self) -> u64 {
        self.state().stable
    }

    fn is_canary(&self, node: Option<&str>) -> bool {
        self.rollout
            .as_ref()
            .is_some_and(|r| node.is_some_and(|n| r.canaries.iter().any(|c| c == n)))
    }

    /// The version `node`'s feed is to bring it to, `latest` being the last
    /// published: the latest without canaries; with them, the latest for a
    /// canary unless the rollout holds, the stable version for the others.
    pub fn target(&self, node: Option<&str>, latest: u64) -> u64 {
        if self.rollout.is_none() {
            return latest;
        }
        let state = self.state();
        let held = state.stage == Stage::Held && state.candidate.is_some_and(|c| latest <= c);
        if self.is_canary(node) && !held {
            latest
        } else {
            state.stable.min(latest)
        }
    }

    /// A poll heard: the ADS targets that wait on the feed are asked again
    /// when a node's feed moved.
    pub fn polled(&self, node: &str, epoch: Option<u64>, since: u64) {
        let moved = self.polls().insert(node.to_owned(), (epoch, since)) != Some((epoch, since));
        if moved {
            if let Some(ads) = self.ads.get() {
                ads.refresh();
            }
        }
    }

    /// Whether the node's feed has a whole set of this server's (not in the
    /// middle of a snapshot, nor from another epoch).
    pub fn feed_complete(&self, node: &str) -> bool {
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.polls()
            .get(node)
            .is_some_and(|&(e, since)| e == Some(epoch) && since & CURSOR_BIT == 0)
    }

    fn polled_from(&self, node: &str) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.polls()
            .get(node)
            .filter(|(e, _)| *e == Some(epoch))
            .map(|&(_, since)| since)
    }

    pub fn status(&self) -> Value {
        let state = self.state();
        json!({
            "stage": state.stage.name(),
            "canaries": self.rollout.as_ref().map(|r| r.canaries.clone()).unwrap_or_default(),
            "stable": state.stable,
            "candidate": state.candidate,
            "reason": state.reason,
            "promoted": state.promoted,
            "held": state.held,
        })
    }
}

/// Makes `version` the stable one: kept in the store, then every node's
/// feed is woken to move to it.
fn promote(api: &Api, version: u64, why: &str) -> Result<(), ControlError> {
    api.shared.store.save_meta("stable", &version.to_string())?;
    api.shared.stable.store(version, Ordering::Relaxed);
    {
        let mut state = api.fleet.state();
        state.stable = version;
        state.stage = Stage::Stable;
        state.candidate = None;
        state.reason = None;
        state.promoted += 1;
    }
    eprintln!("serve: version {version} is stable ({why})");
    api.shared.published.send_modify(|_| {});
    Ok(())
}

/// `POST /v1/rollout/promote`: the latest version becomes the stable one at
/// once, whatever the canaries say (an operator's override of a hold).
pub fn promote_latest(api: &Api) -> Result<u64, ControlError> {
    let latest = api.shared.table().seq;
    promote(api, latest, "promoted through the API")?;
    Ok(latest)
}

fn hold(api: &Api, candidate: u64, reason: String) {
    eprintln!("serve: rollout of version {candidate} held: {reason}; the canaries go back to the stable version");
    {
        let mut state = api.fleet.state();
        if state.candidate != Some(candidate) {
            return;
        }
        state.stage = Stage::Held;
        state.reason = Some(reason);
        state.held += 1;
    }
    api.shared.published.send_modify(|_| {});
}

/// The rollout, until the process ends: one look every [`TICK`].
pub fn drive(api: Arc<Api>) {
    let Some(config) = api.fleet.rollout.clone() else {
        return;
    };
    loop {
        std::thread::sleep(TICK);
        if let Err(e) = step(&api, &config) {
            eprintln!("serve: rollout: {e}");
        }
    }
}

fn step(api: &Api, config: &RolloutConfig) -> Result<(), ControlError> {
    let latest = api.shared.table().seq;
    let fleet = &api.fleet;
    let (stable, candidate) = {
        let mut state = fleet.state();
        if latest <= state.stable {
            state.stage = Stage::Stable;
            state.candidate = None;
            return Ok(());
        }
        if state.stage == Stage::Held && state.candidate.is_some_and(|c| latest <= c) {
            return Ok(());
        }
        if state.candidate != Some(latest) {
            // A new write, or one during a bake: the candidate is the latest.
            eprintln!(
                "serve: version {latest} goes to the canaries ({})",
                config.canaries.join(", ")
            );
            state.candidate = Some(latest);
            state.stage = Stage::Canary;
            state.reason = None;
            state.sent_at = Some(Instant::now());
            state.baking_since = None;
            state.baseline.clear();
        }
        (state.stable, latest)
    };
    // Taken: polled from the candidate, refused none of the domains written
    // since the stable version, runs its xDS targets.
    let nodes = api.nodes.reports();
    let xds = fleet.ads().map(AdsServer::status).unwrap_or_default();
    let mut waiting = Vec::new();
    for canary in &config.canaries {
        if let Some(report) = nodes.get(canary) {
            let table = api.shared.table();
            let refused: Vec<&String> = report
                .refused
                .keys()
                .filter(|d| table.get(d).is_some_and(|c| c.seq > stable))
                .collect();
            if !refused.is_empty() {
                let list: Vec<&str> = refused.iter().map(|d| d.as_str()).collect();
                drop(table);
                hold(
                    api,
                    candidate,
                    format!("{canary} refused the policy of {}", list.join(", ")),
                );
                return Ok(());
            }
        }
        let node = xds.iter().find(|n| &n.id == canary);
        for (type_url, t) in node.iter().flat_map(|n| &n.types) {
            if let Some(nack) = t
                .nack
                .as_ref()
                .filter(|n| Some(&n.version) == t.target.as_ref())
            {
                hold(
                    api,
                    candidate,
                    format!(
                        "{canary} NACKed {} {}: {}",
                        short_type(type_url),
                        nack.version,
                        nack.message
                    ),
                );
                return Ok(());
            }
        }
        let fed = fleet.polled_from(canary) == Some(candidate);
        let acked = fleet.ads().is_none()
            || node.is_some_and(|n| {
                n.connected
                    && n.types
                        .values()
                        .all(|t| t.target.is_none() || t.acked == t.target)
            });
        if !(fed && acked) {
            waiting.push(format!(
                "{canary} (feed {}, xDS {})",
                if fed { "taken" } else { "not taken" },
                if acked { "ACKed" } else { "not ACKed" }
            ));
        }
    }
    let (sent_at, baking_since) = {
        let state = fleet.state();
        (state.sent_at, state.baking_since)
    };
    if !waiting.is_empty() {
        if sent_at.is_some_and(|at| at.elapsed() > config.ack_timeout) {
            hold(
                api,
                candidate,
                format!(
                    "not taken within {} s: {}",
                    config.ack_timeout.as_secs_f64(),
                    waiting.join(", ")
                ),
            );
        }
        return Ok(());
    }
    let names = [COMPLETED, SERVER_ERRORS, config.failover_counter.as_str()];
    let read = |admin: &str| -> Result<[u64; 3], String> {
        let v = admin::counters(admin, &names, Duration::from_secs(2))?;
        Ok([v[0], v[1], v[2]])
    };
    let Some(baking_since) = baking_since else {
        let mut baseline = HashMap::new();
        for canary in &config.canaries {
            let admin = xds
                .iter()
                .find(|n| &n.id == canary)
                .and_then(|n| n.metadata.get("admin").cloned());
            let Some(admin) = admin else {
                hold(
                    api,
                    candidate,
                    format!(
                        "{canary} has no `admin` in its node metadata: its counters cannot be read"
                    ),
                );
                return Ok(());
            };
            match read(&admin) {
                Ok(counters) => {
                    baseline.insert(canary.clone(), (admin, counters));
                }
                Err(why) => {
                    hold(api, candidate, format!("{canary}: {why}"));
                    return Ok(());
                }
            }
        }
        let mut state = fleet.state();
        if state.candidate == Some(candidate) {
            eprintln!(
                "serve: the canaries took version {candidate}; baking for {} s",
                config.bake.as_secs_f64()
            );
            state.stage = Stage::Baking;
            state.baking_since = Some(Instant::now());
            state.baseline = baseline;
        }
        return Ok(());
    };
    let baseline = fleet.state().baseline.clone();
    for (canary, (admin, before)) in &baseline {
        let now = match read(admin) {
            Ok(now) => now,
            Err(why) => {
                hold(api, candidate, format!("{canary}: {why}"));
                return Ok(());
            }
        };
        let completed = now[0].saturating_sub(before[0]);
        if completed < config.min_requests.max(1) {
            continue;
        }
        let rate = |i: usize| now[i].saturating_sub(before[i]) as f64 / completed as f64;
        for (i, what, limit) in [
            (1, "5xx rate", config.max_5xx_rate),
            (2, "failover rate", config.max_failover_rate),
        ] {
            if rate(i) > limit {
                hold(
                    api,
                    candidate,
                    format!(
                        "{canary}: {what} {:.1}% ({} of {completed} requests) over the limit {:.1}%",
                        rate(i) * 100.0,
                        now[i].saturating_sub(before[i]),
                        limit * 100.0
                    ),
                );
                return Ok(());
            }
        }
    }
    if baking_since.elapsed() >= config.bake {
        let still = fleet.state().candidate == Some(candidate);
        if still {
            promote(api, candidate, "the canaries baked it")?;
        }
    }
    Ok(())
}
