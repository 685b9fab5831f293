//! Signing-key rotation, the plan: NEXT (published, not signing) → ACTIVE → RETIRED
//! (published until every token it signed has expired, plus leeway) →
//! removed. [`plan`] is a pure function of the time and the key records, so
//! a restart neither skips nor doubles a step and a clock that jumps back
//! activates nothing twice. `engine::rotate` carries the steps out.

use std::time::Duration;

use crate::clock::millis;
use crate::keys::JWKS_MAX_AGE;
use crate::model::{KeyRecord, KeyState};
use crate::store::Millis;

/// Rotation timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// How long a key signs before the next one takes over.
    pub period: Duration,
    /// How long a NEXT key is published before it signs; at least one JWKS
    /// cache lifetime (`Cache-Control: max-age`).
    pub prepublish: Duration,
    /// Clock-skew allowance added to a retired key's life.
    pub leeway: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(24 * 3600),
            prepublish: JWKS_MAX_AGE.saturating_mul(2),
            leeway: Duration::from_secs(60),
        }
    }
}

/// One thing to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create and publish the next key.
    CreateNext,
    /// NEXT `next` starts signing; ACTIVE `old` retires.
    Promote {
        /// Key that starts signing.
        next: String,
        /// Key that retires (if any).
        old: Option<String>,
    },
    /// A retired key's last token has expired: unpublish it.
    Remove(String),
}

/// When the active key is due to hand over (`forced` is an earlier time an
/// operator asked for).
pub fn next_rotation(
    keys: &[KeyRecord],
    schedule: &Schedule,
    forced: Option<Millis>,
) -> Option<Millis> {
    let active = keys.iter().find(|k| k.state == KeyState::Active)?;
    let due = active
        .activated_at
        .unwrap_or(active.created_at)
        .saturating_add(millis(schedule.period));
    Some(forced.map_or(due, |f| f.min(due)))
}

/// What is due at `now`, and when to look again.
pub fn plan(
    now: Millis,
    keys: &[KeyRecord],
    schedule: &Schedule,
    forced: Option<Millis>,
) -> (Vec<Step>, Option<Millis>) {
    let mut steps = Vec::new();
    let mut wake: Option<Millis> = None;
    let mut at = |t: Millis| wake = Some(wake.map_or(t, |w| w.min(t)));
    let next = keys
        .iter()
        .filter(|k| k.state == KeyState::Next)
        .min_by_key(|k| k.created_at);
    if let Some(rotate_at) = next_rotation(keys, schedule, forced) {
        let publish_at = rotate_at.saturating_sub(millis(schedule.prepublish));
        match next {
            None if now >= publish_at => steps.push(Step::CreateNext),
            None => at(publish_at),
            // INVARIANT: a NEXT key signs only after it has been published
            // for `prepublish`, whatever an operator forced.
            Some(n) => {
                let ready = n
                    .created_at
                    .saturating_add(millis(schedule.prepublish))
                    .max(rotate_at);
                if now >= ready {
                    let old = keys
                        .iter()
                        .find(|k| k.state == KeyState::Active)
                        .map(|k| k.kid.clone());
                    steps.push(Step::Promote {
                        next: n.kid.clone(),
                        old,
                    });
                } else {
                    at(ready);
                }
            }
        }
    }
    for k in keys.iter().filter(|k| k.state == KeyState::Retired) {
        match k.retire_at {
            Some(t) if t <= now => steps.push(Step::Remove(k.kid.clone())),
            Some(t) => at(t),
            None => steps.push(Step::Remove(k.kid.clone())),
        }
    }
    (steps, wake)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        kid: &str,
        state: KeyState,
        created: Millis,
        activated: Option<Millis>,
        retire: Option<Millis>,
    ) -> KeyRecord {
        KeyRecord {
            kid: kid.into(),
            alg: "ES256".into(),
            state,
            public: vec![],
            sealed_private: vec![],
            created_at: created,
            activated_at: activated,
            retire_at: retire,
        }
    }

    const H: Millis = 3_600_000;

    fn sched() -> Schedule {
        Schedule {
            period: Duration::from_secs(24 * 3600),
            prepublish: Duration::from_secs(600),
            leeway: Duration::from_secs(60),
        }
    }

    #[test]
    fn publishes_ahead_promotes_on_time_and_removes_after_the_window() {
        let keys = vec![key("a", KeyState::Active, 0, Some(0), None)];
        let (steps, wake) = plan(H, &keys, &sched(), None);
        assert!(steps.is_empty());
        assert_eq!(wake, Some(24 * H - 600_000), "wake to pre-publish");
        let (steps, _) = plan(24 * H - 600_000, &keys, &sched(), None);
        assert_eq!(steps, [Step::CreateNext]);

        let keys = vec![
            key("a", KeyState::Active, 0, Some(0), None),
            key("b", KeyState::Next, 24 * H - 600_000, None, None),
        ];
        let (steps, wake) = plan(24 * H - 1, &keys, &sched(), None);
        assert!(steps.is_empty());
        assert_eq!(wake, Some(24 * H));
        let (steps, _) = plan(24 * H, &keys, &sched(), None);
        assert_eq!(
            steps,
            [Step::Promote {
                next: "b".into(),
                old: Some("a".into())
            }]
        );

        let keys = vec![
            key("a", KeyState::Retired, 0, Some(0), Some(50 * H)),
            key("b", KeyState::Active, 1, Some(24 * H), None),
        ];
        let (steps, wake) = plan(30 * H, &keys, &sched(), None);
        assert!(steps.is_empty());
        assert_eq!(
            wake,
            Some(48 * H - 600_000),
            "next pre-publication comes first"
        );
        let (steps, _) = plan(50 * H, &keys, &sched(), None);
        assert!(steps.contains(&Step::Remove("a".into())));
    }

    #[test]
    fn a_forced_rotation_never_skips_pre_publication() {
        let keys = vec![key("a", KeyState::Active, 0, Some(0), None)];
        let (steps, _) = plan(H, &keys, &sched(), Some(H));
        assert_eq!(steps, [Step::CreateNext]);
        let keys = vec![
            key("a", KeyState::Active, 0, Some(0), None),
            key("b", KeyState::Next, H, None, None),
        ];
        let (steps, wake) = plan(H, &keys, &sched(), Some(H));
        assert!(steps.is_empty(), "b was published just now");
        assert_eq!(wake, Some(H + 600_000));
    }

    #[test]
    fn a_clock_that_jumps_back_activates_nothing() {
        let keys = vec![
            key("a", KeyState::Retired, 0, Some(0), Some(50 * H)),
            key("b", KeyState::Active, 1, Some(24 * H), None),
        ];
        let (steps, _) = plan(10 * H, &keys, &sched(), None);
        assert!(steps.is_empty(), "{steps:?}");
    }
}
