//! The `--experts SPEC` grammar: which (layer, expert) pairs a worker hosts.
//!
//! A SPEC is a comma-separated list of `LAYERS:EXPERTS` items, each side `*`
//! (all), `N`, or `A-B` (inclusive). `*:*` hosts everything; `0-3:0-15,4:7`
//! hosts experts 0..=15 of layers 0..=3 and expert 7 of layer 4.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    All,
    Span(u32, u32),
}

impl Range {
    fn parse(text: &str) -> Result<Self, String> {
        let num = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("`{s}` is not a number"));
        match text.trim() {
            "*" => Ok(Range::All),
            t => match t.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("range `{t}` is empty"));
                    }
                    Ok(Range::Span(a, b))
                }
                None => num(t).map(|n| Range::Span(n, n)),
            },
        }
    }

    fn contains(self, n: u32) -> bool {
        match self {
            Range::All => true,
            Range::Span(a, b) => (a..=b).contains(&n),
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::All => write!(f, "*"),
            Range::Span(a, b) if a == b => write!(f, "{a}"),
            Range::Span(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// A parsed `--experts` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSpec {
    items: Vec<(Range, Range)>,
}

impl ExpertSpec {
    /// Every expert of every layer.
    pub fn all() -> Self {
        ExpertSpec { items: vec![(Range::All, Range::All)] }
    }

    /// Exactly the listed `(layer, expert)` pairs; runs of consecutive
    /// experts of one layer become one range (`3:4-9`).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut items: Vec<(Range, Range)> = Vec::new();
        for (l, e) in pairs {
            match items.last_mut() {
                Some((Range::Span(a, _), Range::Span(_, end))) if *a == l && end.checked_add(1) == Some(e) => *end = e,
                _ => items.push((Range::Span(l, l), Range::Span(e, e))),
            }
        }
        ExpertSpec { items }
    }

    /// Whether it names no expert at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn contains(&self, layer: u32, expert: u32) -> bool {
        self.items.iter().any(|(l, e)| l.contains(layer) && e.contains(expert))
    }
}

impl std::str::FromStr for ExpertSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let items = text
            .split(',')
            .map(|item| {
                let (l, e) = item.split_once(':').ok_or_else(|| format!("`{item}` is not LAYERS:EXPERTS"))?;
                Ok((Range::parse(l)?, Range::parse(e)?))
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("bad expert spec `{text}`: {e}"))?;
        Ok(ExpertSpec { items })
    }
}

impl fmt::Display for ExpertSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (l, e)) in self.items.iter().enumerate() {
            write!(f, "{}{l}:{e}", if i > 0 { "," } else { "" })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_round_trips() {
        let spec: ExpertSpec = "0-3:0-15, 4:7,*:63".parse().unwrap();
        assert!(spec.contains(2, 15) && spec.contains(4, 7) && spec.contains(9, 63));
        assert!(!spec.contains(4, 8) && !spec.contains(5, 0));
        assert_eq!(spec.to_string().parse::<ExpertSpec>().unwrap(), spec);
        assert!("*:*".parse::<ExpertSpec>().unwrap().contains(100, 100));
        let pairs = ExpertSpec::from_pairs([(1, 2), (3, 4)]);
        assert_eq!(pairs.to_string(), "1:2,3:4");
        let runs = ExpertSpec::from_pairs([(0, 1), (0, 2), (0, 3), (0, 5), (1, 6), (1, 7)]);
        assert_eq!(runs.to_string(), "0:1-3,0:5,1:6-7");
        assert!(ExpertSpec::from_pairs([]).is_empty());
    }

    #[test]
    fn rejects_junk() {
        for bad in ["", "3", "a:1", "1:2-1", "1:-", "1:2,", "1:99999999999"] {
            assert!(bad.parse::<ExpertSpec>().is_err(), "{bad}");
        }
    }
}
