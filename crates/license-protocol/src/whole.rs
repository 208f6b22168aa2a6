//! Integers in JSON bodies as JSON Schema reads them: `60` and `60.0` are the same integer, so
//! a client generated from the OpenAPI document (`"type": "integer"`) may write either. serde
//! alone refuses `60.0` for an integer field; these `deserialize_with` functions take a JSON
//! number without a fractional part, within the field's range, and refuse anything else.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// Below 2^53 every whole `f64` is exact; beyond it a float may stand for several integers.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// The whole number `n` as an `i128` (covers both `u64` and `i64`), or why not.
fn whole(n: &serde_json::Number) -> Result<i128, String> {
    if let Some(n) = n.as_u64() {
        return Ok(i128::from(n));
    }
    if let Some(n) = n.as_i64() {
        return Ok(i128::from(n));
    }
    match n.as_f64() {
        #[allow(clippy::cast_possible_truncation)]
        Some(f) if f.fract() == 0.0 && f.abs() < EXACT => Ok(f as i128),
        _ => Err(format!("invalid value: {n}, expected an integer")),
    }
}

/// A `u64` field.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let value = whole(&n).map_err(D::Error::custom)?;
    u64::try_from(value)
        .map_err(|_| D::Error::custom(format!("invalid value: {n}, expected a u64")))
}

/// An `i64` field.
pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let value = whole(&n).map_err(D::Error::custom)?;
    i64::try_from(value)
        .map_err(|_| D::Error::custom(format!("invalid value: {n}, expected an i64")))
}

/// A `u32` field.
pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let value = whole(&n).map_err(D::Error::custom)?;
    u32::try_from(value)
        .map_err(|_| D::Error::custom(format!("invalid value: {n}, expected a u32")))
}

/// An optional `i64` field (`null` or absent with `#[serde(default)]`: `None`).
pub fn option_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "i64")] i64);
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(n)| n))
}

/// An optional `u64` field (`null` or absent with `#[serde(default)]`: `None`).
pub fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "u64")] u64);
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(n)| n))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Fields {
        #[serde(deserialize_with = "super::u64")]
        unsigned: u64,
        #[serde(deserialize_with = "super::i64")]
        signed: i64,
        #[serde(default, deserialize_with = "super::option_u64")]
        optional: Option<u64>,
    }

    fn parse(unsigned: &str, signed: &str) -> Result<Fields, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"unsigned": {unsigned}, "signed": {signed}}}"#
        ))
    }

    #[test]
    fn whole_numbers_are_integers_however_written() {
        let f = parse("60.0", "-150955.0").unwrap();
        assert_eq!((f.unsigned, f.signed, f.optional), (60, -150_955, None));
        let f = parse("18446744073709551615", "-9223372036854775808").unwrap();
        assert_eq!((f.unsigned, f.signed), (u64::MAX, i64::MIN));
        let f: Fields =
            serde_json::from_str(r#"{"unsigned": 1, "signed": 1, "optional": 7.0}"#).unwrap();
        assert_eq!(f.optional, Some(7));
        let f: Fields =
            serde_json::from_str(r#"{"unsigned": 1, "signed": 1, "optional": null}"#).unwrap();
        assert_eq!(f.optional, None);
    }

    #[test]
    fn anything_else_is_refused() {
        for (unsigned, signed) in [
            ("60.5", "0"),
            ("-1", "0"),
            ("-1.0", "0"),
            ("18446744073709551616", "0"),
            ("1e300", "0"),
            ("\"60\"", "0"),
            ("0", "9223372036854775808"),
            ("0", "0.25"),
            ("0", "true"),
        ] {
            assert!(parse(unsigned, signed).is_err(), "{unsigned} {signed}");
        }
    }
}
