//! JSON written the way Python's `json.dumps(value, ensure_ascii=False)`
//! writes it, which is what DeepSeek-V4's reference encoder puts into
//! prompts (tool schemas, non-string tool arguments): `", "` and `": "`
//! separators, keys in their given order, non-ASCII characters as they are,
//! and floats as Python's `repr` prints them (`1e3` becomes `1000.0`,
//! `1e-05`, `1e+16`).

use serde_json::Value;

pub fn dumps(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// A string as a JSON string literal (the same escapes as Python's).
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => out.push_str(&float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => out.push_str(&quote(s)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&quote(key));
                out.push_str(": ");
                write(item, out);
            }
            out.push('}');
        }
    }
}

/// Python's `repr` of a finite float: the shortest digits that read back
/// to it, positional when the decimal exponent is in `-4..16` (with at
/// least one digit after the point), scientific otherwise (`1.5e-05`).
fn float(f: f64) -> String {
    // Rust's `{:e}` gives the same shortest digits: "1.25e1", "-1e-5".
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let point = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{first}{point}e{exp_sign}{:02}", exponent.abs());
    }
    let body = if exponent < 0 {
        format!("0.{}{digits}", "0".repeat((-exponent - 1) as usize))
    } else {
        let int_len = exponent as usize + 1;
        if digits.len() > int_len {
            format!("{}.{}", &digits[..int_len], &digits[int_len..])
        } else {
            format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
        }
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (1000.0, "1000.0"),
            (12.5, "12.5"),
            (-0.0, "-0.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (123456789012345.6, "123456789012345.6"),
            (0.1, "0.1"),
            (2.0 / 3.0, "0.6666666666666666"),
            (1e300, "1e+300"),
        ];
        for (f, expected) in cases {
            assert_eq!(float(f), expected, "{f}");
        }
    }

    #[test]
    fn objects_keep_their_order_and_python_separators() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.5, "é\n\"q\""], "a": {"x": null, "y": 1e3, "z": true}}"#).unwrap();
        assert_eq!(dumps(&v), r#"{"b": [1, 2.5, "é\n\"q\""], "a": {"x": null, "y": 1000.0, "z": true}}"#);
    }
}
