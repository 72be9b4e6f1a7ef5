//! Which address a request came from. Behind a load balancer the peer is the proxy, so the
//! `X-Forwarded-For` chain is believed only from configured trusted proxies, and only as far
//! back as the first hop that is not one of them.

use std::net::IpAddr;

use ipnet::IpNet;

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A malformed hop ends what we can believe.
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ];
        let cases: &[(&str, Option<&str>, &str)] = &[
            // Untrusted peer: its header is ignored.
            ("203.0.113.9", Some("1.2.3.4"), "203.0.113.9"),
            // Trusted peer without header.
            ("10.1.1.1", None, "10.1.1.1"),
            // Trusted peer: right-most untrusted hop.
            ("10.1.1.1", Some("1.2.3.4"), "1.2.3.4"),
            ("10.1.1.1", Some("6.6.6.6, 1.2.3.4, 10.2.2.2"), "1.2.3.4"),
            ("192.0.2.1", Some("6.6.6.6,1.2.3.4"), "1.2.3.4"),
            // Spoofed garbage before a real hop does not win.
            ("10.1.1.1", Some("evil, 1.2.3.4"), "1.2.3.4"),
            // Garbage at the right end: stop at the proxy.
            ("10.1.1.1", Some("1.2.3.4, nonsense"), "10.1.1.1"),
            // All hops trusted: the left-most.
            ("10.1.1.1", Some("10.3.3.3, 10.2.2.2"), "10.3.3.3"),
            ("10.1.1.1", Some("2001:db8::1"), "2001:db8::1"),
        ];
        for (peer, header, expected) in cases {
            let got = client_ip(peer.parse().unwrap(), *header, &trusted);
            assert_eq!(got.to_string(), *expected, "peer {peer} header {header:?}");
        }
    }

    #[test]
    fn nothing_trusted_by_default() {
        let got = client_ip("10.1.1.1".parse().unwrap(), Some("1.2.3.4"), &[]);
        assert_eq!(got.to_string(), "10.1.1.1");
    }
}
