//! permessage-deflate negotiation (RFC 7692 §5 and §7.1), one leg at a time: the client's
//! offers read and answered, the gateway's own offer to the upstream written, and the
//! upstream's answer checked. The two legs negotiate independently; what each agreed is an
//! [`Agreed`], which the codec (`deflate.rs`) follows.
//!
//! One reason to change: the negotiation rules. No compression happens here, and nothing here
//! touches a socket.
//!
//! Window sizes: the compressor (zlib-rs) cannot use a 256-byte window
//! (8 bits) for raw DEFLATE, so the gateway never agrees to compress with one: a client offer
//! with `server_max_window_bits=8` is declined (RFC 7692 §7.1.2.1 lets a server decline an
//! offer it cannot honour), and the upstream offer never includes `client_max_window_bits`
//! (which would let the upstream ask for 8). Any peer window reads fine.

/// The extension's registered name.
const NAME: &str = "permessage-deflate";

/// What one leg agreed for permessage-deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// The peer starts each message with an empty window (its `*_no_context_takeover`), so
    /// the gateway's decompressor for this leg needs no state between messages.
    pub(crate) peer_resets: bool,
    /// The gateway starts each message it compresses with an empty window (asked by the
    /// peer, or by `compression_context_takeover = false`).
    pub(crate) gateway_resets: bool,
    /// The largest window the peer compresses with, in bits (9 to 15; 8 is read as 9).
    pub(crate) peer_window_bits: u8,
    /// The largest window the gateway may compress with, in bits (9 to 15).
    pub(crate) gateway_window_bits: u8,
    /// How the gateway compresses what it sends: the route's, not negotiated.
    pub(crate) sending: Sending,
}

/// How the gateway compresses the messages it sends on a leg that agreed permessage-deflate:
/// the route's `compression_level` and `compression_threshold`. Nothing here is negotiated:
/// RFC 7692 §6 lets a sender send any message uncompressed, and the level is the sender's
/// own business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sending {
    /// zlib's level, 1 (fastest) to 9 (smallest); 0: every message is sent uncompressed.
    pub(crate) level: u8,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub(crate) threshold: usize,
}

/// The route's compression settings, as negotiation needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// `compression_context_takeover`: whether windows may be kept from message to message
    /// (better ratio, but a compressor and a decompressor per connection).
    pub(crate) context_takeover: bool,
    /// `compression_window_bits` (9 to 15): the largest window the gateway compresses with
    /// and asks its peers to compress with, where the peer lets it ask.
    pub(crate) window_bits: u8,
    /// How the gateway compresses on the legs that agree.
    pub(crate) sending: Sending,
}

/// One extension parameter: its name and value (unquoted), as offered.
type Param = (String, Option<String>);

/// One element of an extension list: its name and parameters, or `None` when it does not
/// parse (it is then declined, as an offer with invalid parameters is).
type Element = Option<(String, Vec<Param>)>;

/// Reads `Sec-WebSocket-Extensions` values (RFC 6455 §9.1: a comma-separated list of
/// `name *(";" param ["=" (token | quoted-string)])`), every header line in order.
fn elements<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<Element> {
    let mut out = Vec::new();
    for value in values {
        let mut p = Parser { s: value, at: 0 };
        loop {
            p.skip_ows();
            if p.at >= p.s.len() {
                break;
            }
            if p.peek() == Some(b',') {
                p.at += 1;
                continue;
            }
            let element = p.element();
            if element.is_none() {
                p.skip_element();
            }
            out.push(element);
        }
    }
    out
}

/// A cursor over one header value.
struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

/// RFC 9110 tchar.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    fn quoted(&mut self) -> Option<String> {
        self.at += 1; // the opening quote
        let mut value = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return String::from_utf8(value).ok();
                }
                b'\\' => {
                    self.at += 1;
                    value.push(self.peek()?);
                }
                c => value.push(c),
            }
            self.at += 1;
        }
    }

    /// One element up to (not past) the next top-level comma or the end.
    fn element(&mut self) -> Element {
        let name = self.token()?;
        let mut params = Vec::new();
        loop {
            self.skip_ows();
            match self.peek() {
                None | Some(b',') => return Some((name, params)),
                Some(b';') => self.at += 1,
                Some(_) => return None,
            }
            self.skip_ows();
            let param = self.token()?;
            self.skip_ows();
            let value = if self.peek() == Some(b'=') {
                self.at += 1;
                self.skip_ows();
                Some(if self.peek() == Some(b'"') {
                    self.quoted()?
                } else {
                    self.token()?
                })
            } else {
                None
            };
            params.push((param, value));
        }
    }

    /// Skips the rest of an element that did not parse, up to the next comma outside quotes.
    fn skip_element(&mut self) {
        let mut quoted = false;
        while let Some(c) = self.peek() {
            match c {
                b'"' => quoted = !quoted,
                b'\\' if quoted => self.at += 1,
                b',' if !quoted => return,
                _ => {}
            }
            self.at += 1;
        }
    }
}

/// A window size parameter's value: an integer from 8 to 15 without leading zeros
/// (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    match value.parse::<u8>() {
        Ok(bits @ 8..=15) if !value.starts_with('0') && !value.starts_with('+') => Some(bits),
        _ => None,
    }
}

/// The permessage-deflate parameters of one offer or answer, each at most once.
#[derive(Default)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// Reads `params`; `Err` names the first one that is unknown, repeated or has a bad value.
fn read_params(params: &[Param]) -> Result<Params, String> {
    let mut p = Params::default();
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in params {
        let name_lc = name.to_ascii_lowercase();
        if seen.contains(&name_lc) {
            return Err(format!("{name} given twice"));
        }
        let bad = || Err(format!("{name} with a bad value"));
        match (name_lc.as_str(), value) {
            ("server_no_context_takeover", None) => p.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => p.client_no_context_takeover = true,
            ("server_max_window_bits", Some(v)) => match window_bits(v) {
                Some(bits) => p.server_max_window_bits = Some(bits),
                None => return bad(),
            },
            ("client_max_window_bits", None) => p.client_max_window_bits = Some(None),
            ("client_max_window_bits", Some(v)) => match window_bits(v) {
                Some(bits) => p.client_max_window_bits = Some(Some(bits)),
                None => return bad(),
            },
            (
                "server_no_context_takeover"
                | "client_no_context_takeover"
                | "server_max_window_bits",
                _,
            ) => return bad(),
            _ => return Err(format!("unknown parameter {name}")),
        }
        seen.push(name_lc);
    }
    Ok(p)
}

/// The client leg, where the gateway is the server: the first permessage-deflate offer among
/// the client's `Sec-WebSocket-Extensions` values that the gateway can honour, answered.
/// Returns the response header's value and what was agreed; `None` declines compression (the
/// 101 then has no `Sec-WebSocket-Extensions`). Offers with unknown, repeated or invalid
/// parameters are declined one by one (RFC 7692 §5), as are those asking the gateway for a
/// window smaller than its compressor's.
pub(crate) fn answer_client<'a>(
    offers: impl Iterator<Item = &'a [u8]>,
    settings: Settings,
) -> Option<(String, Agreed)> {
    for element in elements(offers) {
        let Some((name, params)) = element else {
            continue;
        };
        if !name.eq_ignore_ascii_case(NAME) {
            continue;
        }
        let Ok(offer) = read_params(&params) else {
            continue;
        };
        // The gateway's compressor cannot do 8 bits.
        if offer.server_max_window_bits == Some(8) {
            continue;
        }
        // A server may add either no-context-takeover parameter to its answer unasked
        // (RFC 7692 §7.1.1): the gateway does, to keep no window between messages.
        let server_resets = offer.server_no_context_takeover || !settings.context_takeover;
        let client_resets = offer.client_no_context_takeover || !settings.context_takeover;
        let mut response = NAME.to_owned();
        if server_resets {
            response.push_str("; server_no_context_takeover");
        }
        if client_resets {
            response.push_str("; client_no_context_takeover");
        }
        // The gateway's window: at most what the client allows and what the route allows;
        // said whenever it is below 15 or the client asked (§7.1.2.1).
        let gateway_window_bits = offer
            .server_max_window_bits
            .unwrap_or(15)
            .min(settings.window_bits);
        if offer.server_max_window_bits.is_some() || gateway_window_bits < 15 {
            response.push_str(&format!("; server_max_window_bits={gateway_window_bits}"));
        }
        // The client's window: a smaller one may be asked only of a client that offered
        // client_max_window_bits (§7.1.2.2).
        let mut peer_window_bits = 15;
        if let Some(offered) = offer.client_max_window_bits {
            let offered = offered.unwrap_or(15);
            peer_window_bits = offered.min(settings.window_bits);
            if settings.window_bits < offered {
                response.push_str(&format!("; client_max_window_bits={peer_window_bits}"));
            }
        }
        return Some((
            response,
            Agreed {
                peer_resets: client_resets,
                gateway_resets: server_resets,
                peer_window_bits: peer_window_bits.max(9),
                gateway_window_bits,
                sending: settings.sending,
            },
        ));
    }
    None
}

/// The gateway's offer to the upstream, where it is the client.
pub(crate) fn upstream_offer(settings: Settings) -> String {
    let mut offer = NAME.to_owned();
    if !settings.context_takeover {
        offer.push_str("; server_no_context_takeover; client_no_context_takeover");
    }
    if settings.window_bits < 15 {
        offer.push_str(&format!(
            "; server_max_window_bits={}",
            settings.window_bits
        ));
    }
    offer
}

/// The upstream leg: checks the upstream's answer to [`upstream_offer`]. `Ok(None)`: it
/// declined (no `Sec-WebSocket-Extensions`). `Err` says what makes the answer invalid: an
/// extension or a parameter that was not offered, a repeated or invalid parameter, or more
/// than one extension (RFC 7692 §5: the client must then fail the connection).
///
/// An upstream that accepts without `server_no_context_takeover` although it was offered is
/// taken at its word: its messages are read with a window kept between them.
pub(crate) fn accept_upstream<'a>(
    answers: impl Iterator<Item = &'a [u8]>,
    settings: Settings,
) -> Result<Option<Agreed>, String> {
    let mut elements = elements(answers).into_iter();
    let Some(first) = elements.next() else {
        return Ok(None);
    };
    if elements.next().is_some() {
        return Err("more than one extension accepted".into());
    }
    let Some((name, params)) = first else {
        return Err("Sec-WebSocket-Extensions does not parse".into());
    };
    if !name.eq_ignore_ascii_case(NAME) {
        return Err(format!("extension {name} was not offered"));
    }
    let answer = read_params(&params)?;
    if answer.client_max_window_bits.is_some() {
        return Err("client_max_window_bits was not offered".into());
    }
    if settings.window_bits < 15
        && answer
            .server_max_window_bits
            .is_some_and(|bits| bits > settings.window_bits)
    {
        return Err("server_max_window_bits larger than offered".into());
    }
    Ok(Some(Agreed {
        peer_resets: answer.server_no_context_takeover,
        gateway_resets: answer.client_no_context_takeover || !settings.context_takeover,
        peer_window_bits: answer.server_max_window_bits.unwrap_or(15).max(9),
        // No client_max_window_bits was offered, so the upstream cannot ask for a smaller
        // window: the route's own is used (a smaller window than allowed is always fine).
        gateway_window_bits: settings.window_bits,
        sending: settings.sending,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENDING: Sending = Sending {
        level: 1,
        threshold: 1024,
    };
    const NO_TAKEOVER: Settings = Settings {
        context_takeover: false,
        window_bits: 15,
        sending: SENDING,
    };
    const TAKEOVER: Settings = Settings {
        context_takeover: true,
        window_bits: 15,
        sending: SENDING,
    };

    fn terms(peer_resets: bool, gateway_resets: bool, peer: u8, gateway: u8) -> Agreed {
        Agreed {
            peer_resets,
            gateway_resets,
            peer_window_bits: peer,
            gateway_window_bits: gateway,
            sending: SENDING,
        }
    }

    fn answer(offers: &[&str], settings: Settings) -> Option<(String, Agreed)> {
        answer_client(offers.iter().map(|o| o.as_bytes()), settings)
    }

    #[test]
    fn browsers_offer_is_accepted() {
        // Chromium's and Firefox's offer.
        let (response, agreed) =
            answer(&["permessage-deflate; client_max_window_bits"], TAKEOVER).unwrap();
        assert_eq!(response, "permessage-deflate");
        assert_eq!(agreed, terms(false, false, 15, 15));
        let (response, agreed) =
            answer(&["permessage-deflate; client_max_window_bits"], NO_TAKEOVER).unwrap();
        assert_eq!(
            response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert!(agreed.peer_resets && agreed.gateway_resets);
    }

    #[test]
    fn invalid_offers_are_declined_one_by_one() {
        let offers = [
            "x-webkit-deflate-frame, permessage-deflate; foo=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=16, permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=07",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; server_max_window_bits=\"10\"; client_max_window_bits=\"9\"",
        ];
        let (response, agreed) = answer(&offers, TAKEOVER).unwrap();
        assert_eq!(response, "permessage-deflate; server_max_window_bits=10");
        assert_eq!(agreed, terms(false, false, 9, 10));
        assert_eq!(answer(&offers[..6], TAKEOVER), None);
        assert_eq!(
            answer(&["permessage-deflate; a=\"x,y\"; , "], TAKEOVER),
            None
        );
        assert_eq!(answer(&["permessage-deflate;;"], TAKEOVER), None);
        assert_eq!(answer(&[""], TAKEOVER), None);
        // A quoted comma does not split the list; the next offer is read.
        let (_, agreed) = answer(
            &["permessage-deflate; x=\"a,b\", PerMessage-Deflate; Client_No_Context_Takeover"],
            TAKEOVER,
        )
        .unwrap();
        assert!(agreed.peer_resets);
    }

    #[test]
    fn smaller_windows() {
        let small = Settings {
            context_takeover: true,
            window_bits: 10,
            sending: SENDING,
        };
        let (response, agreed) =
            answer(&["permessage-deflate; client_max_window_bits"], small).unwrap();
        assert_eq!(
            response,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=10"
        );
        assert_eq!(agreed, terms(false, false, 10, 10));
        // Without client_max_window_bits in the offer, the client's window cannot be asked.
        let (response, agreed) = answer(&["permessage-deflate"], small).unwrap();
        assert_eq!(response, "permessage-deflate; server_max_window_bits=10");
        assert_eq!(agreed, terms(false, false, 15, 10));
        assert_eq!(
            upstream_offer(small),
            "permessage-deflate; server_max_window_bits=10"
        );
        let accept = |a: &str| accept_upstream(std::iter::once(a.as_bytes()), small);
        assert!(accept("permessage-deflate; server_max_window_bits=12").is_err());
        assert_eq!(
            accept("permessage-deflate; server_max_window_bits=10"),
            Ok(Some(terms(false, false, 10, 10)))
        );
    }

    #[test]
    fn upstream_answers() {
        let accept = |a: &[&str]| accept_upstream(a.iter().map(|s| s.as_bytes()), NO_TAKEOVER);
        assert_eq!(accept(&[]), Ok(None));
        assert_eq!(
            accept(&["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]),
            Ok(Some(terms(true, true, 15, 15)))
        );
        assert_eq!(
            accept(&["permessage-deflate; server_max_window_bits=8"]),
            Ok(Some(terms(false, true, 9, 15)))
        );
        for bad in [
            "permessage-deflate; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; mystery",
            "permessage-deflate, permessage-deflate",
            "x-webkit-deflate-frame",
            "permessage-deflate; ;",
        ] {
            assert!(accept(&[bad]).is_err(), "{bad}");
        }
    }
}
