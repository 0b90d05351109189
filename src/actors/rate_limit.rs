//! The per-client creation rate limit: one token bucket per client identity, so one client
//! creating conversations in a loop cannot fill the server and lock everyone else out.
//!
//! A bucket holds `limits.create_burst` tokens and refills at `limits.create_rate_per_sec`; a
//! `POST /api/conversations` that brings up a conversation (creating it, or resuming a stopped
//! one) takes a token, and is refused with the time until the next one when there is none.
//! Joining a running conversation, `start`, user actions and sockets never take a token.
//! The buckets are `governor`'s GCRA cells (one timestamp per client); a bucket that has
//! refilled completely is indistinguishable from a new one and is dropped by [`sweep`], so the
//! map only holds clients active within the last `burst / rate` seconds.
//!
//! [`sweep`]: CreateLimiter::sweep

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Who is creating: the identity a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    /// Whoever presented the server's session key (all holders of the one key are one client).
    SessionKey,
    /// A user key's user, by name (however many addresses it comes from).
    User(Arc<str>),
    /// A client without a key, by its address: IPv4 as is, IPv6 by its /64 network (one host
    /// commonly owns a whole /64).
    Peer(IpAddr),
}

impl ClientId {
    /// The identity of a client that presented no key, from its peer address.
    pub fn peer(ip: IpAddr) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let network = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(network.into())
                }
            },
            v4 => v4,
        };
        ClientId::Peer(ip)
    }
}

type Limiter = RateLimiter<ClientId, DefaultKeyedStateStore<ClientId>, DefaultClock>;

/// The buckets of every client; off when the rate is 0.
pub struct CreateLimiter {
    limiter: Option<Limiter>,
}

impl CreateLimiter {
    /// `rate_per_sec` tokens per second with room for `burst`; a rate of 0 switches it off.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        CreateLimiter { limiter }
    }

    pub fn enabled(&self) -> bool {
        self.limiter.is_some()
    }

    /// Takes a token from `client`'s bucket, or says how long until one is there.
    pub fn check(&self, client: &ClientId) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Drops every bucket that has refilled completely (idle clients).
    pub fn sweep(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Buckets currently kept.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, Limiter::len)
    }
}

/// Whole seconds to wait, rounded up and at least 1 (the `Retry-After` value).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limiter = CreateLimiter::new(1, 3);
        let a = ClientId::peer("10.0.0.1".parse().unwrap());
        let b = ClientId::peer("10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(limiter.check(&a), Ok(()));
        }
        let wait = limiter.check(&a).expect_err("the burst is spent");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(limiter.check(&b), Ok(()));
        assert_eq!(limiter.check(&ClientId::SessionKey), Ok(()));
        // Users are counted apart from each other and from the session key.
        let alice = ClientId::User(Arc::from("alice"));
        for _ in 0..3 {
            assert_eq!(limiter.check(&alice), Ok(()));
        }
        assert!(limiter.check(&alice).is_err());
        assert_eq!(limiter.check(&ClientId::User(Arc::from("bob"))), Ok(()));
        assert_eq!(limiter.tracked(), 5);
    }

    #[test]
    fn rate_zero_is_off() {
        let limiter = CreateLimiter::new(0, 0);
        assert!(!limiter.enabled());
        let a = ClientId::peer("10.0.0.1".parse().unwrap());
        for _ in 0..10_000 {
            assert_eq!(limiter.check(&a), Ok(()));
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn full_buckets_are_swept() {
        let limiter = CreateLimiter::new(1_000_000, 1);
        let a = ClientId::peer("10.0.0.1".parse().unwrap());
        assert_eq!(limiter.check(&a), Ok(()));
        assert_eq!(limiter.tracked(), 1);
        std::thread::sleep(Duration::from_millis(5));
        limiter.sweep();
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_64_network() {
        let one = ClientId::peer("2001:db8:1:2:aaaa::1".parse().unwrap());
        let same = ClientId::peer("2001:db8:1:2:bbbb::9".parse().unwrap());
        let other = ClientId::peer("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(one, same);
        assert_ne!(one, other);
        let mapped = ClientId::peer("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped, ClientId::peer("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
