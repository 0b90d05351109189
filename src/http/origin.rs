//! Who may talk to this server: the `Origin` and `Host` allow-lists, one rule each.
//!
//! [`AllowList::origin_allowed`] decides for the Origin check (state-changing requests and
//! WebSocket upgrades) and for the CORS answers alike. Always allowed: the server's own origin
//! (the origin the request's `Host` names) and loopback origins on any port; added by
//! `[http] allowed_origins`; `*` there switches the check off.
//!
//! [`AllowList::host_allowed`] decides for the Host check, which stops DNS rebinding (a foreign
//! name resolving to this machine): always allowed are `localhost`, IP addresses (a rebound
//! name is never an IP literal) and the bound `host`; added by `[http] allowed_hosts`; `*`
//! switches it off.

use std::net::{IpAddr, Ipv6Addr};

use crate::config::Settings;

/// `host[:port]` of an `Origin` or a `Host` header, the host lowercased and IPv6 kept in its
/// brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    host: String,
    port: Option<u16>,
}

impl Authority {
    fn parse(text: &str) -> Option<Authority> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let end = rest.find(']')?;
            rest[..end].parse::<Ipv6Addr>().ok()?;
            (&text[..end + 2], &rest[end + 1..])
        } else {
            let (host, port) = match text.rfind(':') {
                Some(i) => (&text[..i], &text[i..]),
                None => (text, ""),
            };
            let valid = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return None;
            }
            (host, port)
        };
        let port = match port {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
        };
        Some(Authority {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host as an IP address, when it is one.
    fn ip(&self) -> Option<IpAddr> {
        let bare = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        bare.parse().ok()
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.ip().is_some_and(|ip| ip.is_loopback())
    }
}

/// `http` or `https`, and the port a missing one means.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// An `Origin` header value: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    authority: Authority,
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        default_port(&scheme)?;
        Some(Origin {
            scheme,
            authority: Authority::parse(rest)?,
        })
    }

    fn port(&self) -> Option<u16> {
        self.authority.port.or_else(|| default_port(&self.scheme))
    }
}

/// One entry of `[http] allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: every origin.
    Any,
    /// `scheme://host[:port]`, or `scheme://host:*` (`port: None`) for any port.
    Exact {
        scheme: String,
        host: String,
        port: Option<u16>,
    },
}

impl OriginPattern {
    /// Reads one configured entry; the error says what was expected.
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let expected = || {
            format!(
                "expected \"*\" or origins like \"https://app.example.com\", \
                 \"http://host:8080\" or \"http://host:*\" (scheme, host, optional port, nothing \
                 after it), got {text:?}"
            )
        };
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        let (scheme, rest) = text.split_once("://").ok_or_else(expected)?;
        let scheme = scheme.to_ascii_lowercase();
        let default = default_port(&scheme).ok_or_else(expected)?;
        if let Some(host) = rest.strip_suffix(":*") {
            let authority = Authority::parse(host)
                .filter(|a| a.port.is_none())
                .ok_or_else(expected)?;
            return Ok(OriginPattern::Exact {
                scheme,
                host: authority.host,
                port: None,
            });
        }
        let authority = Authority::parse(rest).ok_or_else(expected)?;
        Ok(OriginPattern::Exact {
            scheme,
            host: authority.host,
            port: Some(authority.port.unwrap_or(default)),
        })
    }

    fn matches(&self, origin: &Origin) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact { scheme, host, port } => {
                *scheme == origin.scheme
                    && *host == origin.authority.host
                    && port.is_none_or(|p| Some(p) == origin.port())
            }
        }
    }
}

/// One entry of `[http] allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// A name, lowercased.
    Name(String),
    /// `*.domain`: any name under the domain (lowercased, without the `*.`).
    Under(String),
}

impl HostPattern {
    /// Reads one configured entry; the error says what was expected.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let expected = || {
            format!(
                "expected \"*\", a host name like \"switchboard.example.com\" or \
                 \"*.example.com\" (no scheme, no port), got {text:?}"
            )
        };
        if text == "*" {
            return Ok(HostPattern::Any);
        }
        let (under, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let authority = Authority::parse(name)
            .filter(|a| a.port.is_none() && !a.host.starts_with('['))
            .ok_or_else(expected)?;
        Ok(if under {
            HostPattern::Under(authority.host)
        } else {
            HostPattern::Name(authority.host)
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Name(name) => name == host,
            HostPattern::Under(domain) => host
                .strip_suffix(domain.as_str())
                .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.')),
        }
    }
}

/// The allow-lists, read once from the settings.
#[derive(Debug, Clone)]
pub struct AllowList {
    origins: Vec<OriginPattern>,
    hosts: Vec<HostPattern>,
}

impl AllowList {
    /// The lists the settings describe (entries were checked by `Settings::validate`; an entry
    /// that does not parse is left out).
    pub fn from_settings(settings: &Settings) -> AllowList {
        let origins = settings
            .http
            .allowed_origins
            .iter()
            .filter_map(|o| OriginPattern::parse(o).ok())
            .collect();
        let mut hosts: Vec<HostPattern> = settings
            .http
            .allowed_hosts
            .iter()
            .filter_map(|h| HostPattern::parse(h).ok())
            .collect();
        if let Ok(HostPattern::Name(bound)) = HostPattern::parse(&settings.host) {
            hosts.push(HostPattern::Name(bound));
        }
        AllowList { origins, hosts }
    }

    /// Whether the Origin check is off (`allowed_origins` has `*`).
    pub fn any_origin(&self) -> bool {
        self.origins.contains(&OriginPattern::Any)
    }

    /// Whether a request with this `Host` header may be served.
    pub fn host_allowed(&self, host: &str) -> bool {
        if self.hosts.contains(&HostPattern::Any) {
            return true;
        }
        let Some(authority) = Authority::parse(host) else {
            return false;
        };
        authority.is_loopback()
            || authority.ip().is_some()
            || self.hosts.iter().any(|p| p.matches(&authority.host))
    }

    /// Whether a request carrying this `Origin` may change state or open a socket; `host` is
    /// the request's `Host` header, which names the server's own origin.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if self.any_origin() {
            return true;
        }
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        if origin.authority.is_loopback() {
            return true;
        }
        let same_origin = host.and_then(Authority::parse).is_some_and(|own| {
            own.host == origin.authority.host
                && own.port.or_else(|| default_port(&origin.scheme)) == origin.port()
        });
        same_origin || self.origins.iter().any(|p| p.matches(&origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(origins: &[&str], hosts: &[&str], bound: &str) -> AllowList {
        let mut s = Settings::defaults();
        s.host = bound.to_string();
        s.http.allowed_origins = origins.iter().map(|o| o.to_string()).collect();
        s.http.allowed_hosts = hosts.iter().map(|h| h.to_string()).collect();
        s.validate().expect("valid settings");
        AllowList::from_settings(&s)
    }

    #[test]
    fn loopback_and_own_origins_are_allowed_by_default() {
        let l = list(&[], &[], "127.0.0.1");
        for origin in [
            "http://localhost:3001",
            "https://localhost",
            "http://127.0.0.1:5173",
            "http://[::1]:8080",
            "HTTP://LOCALHOST:3000",
        ] {
            assert!(l.origin_allowed(origin, Some("127.0.0.1:3000")), "{origin}");
        }
        assert!(l.origin_allowed("http://mybox.lan:3000", Some("mybox.lan:3000")));
        assert!(l.origin_allowed("http://mybox.lan", Some("mybox.lan:80")));
        assert!(l.origin_allowed("https://mybox.lan", Some("mybox.lan")));
        for origin in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://mybox.lan:3001",
            "null",
            "file://",
            "http://localhost:",
            "",
        ] {
            assert!(
                !l.origin_allowed(origin, Some("mybox.lan:3000")),
                "{origin}"
            );
        }
        assert!(!l.origin_allowed("http://mybox.lan:3000", None));
    }

    #[test]
    fn configured_origins_add_to_the_defaults() {
        let l = list(
            &["https://app.example.com", "http://dev.example.com:*"],
            &[],
            "127.0.0.1",
        );
        assert!(l.origin_allowed("https://app.example.com", None));
        assert!(l.origin_allowed("https://app.example.com:443", None));
        assert!(!l.origin_allowed("http://app.example.com", None));
        assert!(!l.origin_allowed("https://app.example.com:8443", None));
        assert!(l.origin_allowed("http://dev.example.com:1234", None));
        assert!(l.origin_allowed("http://localhost:9", None));
        assert!(!l.origin_allowed("http://evil.example", None));
        assert!(list(&["*"], &[], "127.0.0.1").origin_allowed("http://evil.example", None));
    }

    #[test]
    fn hosts() {
        let l = list(&[], &["switchboard.example.com", "*.lan"], "127.0.0.1");
        for host in [
            "localhost",
            "localhost:3000",
            "127.0.0.1:3000",
            "[::1]:3000",
            "10.1.2.3",
            "switchboard.example.com:443",
            "mybox.lan",
            "LOCALHOST",
        ] {
            assert!(l.host_allowed(host), "{host}");
        }
        for host in [
            "evil.example",
            "lan",
            "evil.example:3000",
            "",
            "a b",
            "[zz]",
        ] {
            assert!(!l.host_allowed(host), "{host}");
        }
        assert!(list(&[], &[], "mybox").host_allowed("mybox:3000"));
        assert!(list(&[], &["*"], "127.0.0.1").host_allowed("evil.example"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for origin in [
            "example.com",
            "ftp://example.com",
            "https://example.com/",
            "https://example.com/path",
            "https://",
            "http://host:port",
        ] {
            assert!(OriginPattern::parse(origin).is_err(), "{origin}");
        }
        for host in ["http://example.com", "example.com:3000", "", "a/b", "*."] {
            assert!(HostPattern::parse(host).is_err(), "{host}");
        }
    }
}
