//! The canonical bytes a cache key digests: a serde serializer that writes every value
//! of serde's data model as a tag, then its content, each string and byte string after
//! its length (a varint), each struct field after its (tagged) name, each sequence and map between an
//! opening and a closing tag.
//!
//! Every value's bytes are self-delimiting, so two different values never write the
//! same bytes (a digest of them is then as collision-resistant as the digest itself),
//! and nothing is escaped or formatted: a request's canonical form costs about a copy
//! of its text. Floats are written by their bits, so `NaN`, `-0.0` and `0.0` all
//! differ. The format is internal to this crate and versioned by the key's `v` field.

use std::fmt;

use serde::Serialize;
use serde::ser::{self, Serializer};

/// Serialization failed: a `Serialize` implementation reported an error of its own.
/// Plain data never does; a request that does is not cached.
#[derive(Debug)]
pub(crate) struct Unserializable;

impl fmt::Display for Unserializable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value could not be serialized")
    }
}

impl std::error::Error for Unserializable {}

impl ser::Error for Unserializable {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Unserializable
    }
}

/// Appends the canonical bytes of `value` to `buf`.
pub(crate) fn write(buf: &mut Vec<u8>, value: &impl Serialize) -> Result<(), Unserializable> {
    value.serialize(&mut Canon(buf))
}

/// Appends a struct field's name as the struct serializer writes it: for appending a
/// field to a struct written without its closing tag.
pub(crate) fn write_field_name(buf: &mut Vec<u8>, name: &str) {
    Canon(buf).field(name);
}

/// The closing tag of a struct.
pub(crate) const STRUCT_END: u8 = b')';

/// The serializer: writes into the buffer it borrows.
struct Canon<'a>(&'a mut Vec<u8>);

impl Canon<'_> {
    fn tag(&mut self, t: u8) {
        self.0.push(t);
    }

    /// A fixed-width value: its tag, then its little-endian bytes.
    fn fixed(&mut self, tag: u8, le_bytes: &[u8]) -> R {
        self.tag(tag);
        self.0.extend_from_slice(le_bytes);
        Ok(())
    }

    /// A length, as an unsigned LEB128 varint (one byte below 128).
    fn len(&mut self, n: usize) {
        let mut n = n as u64;
        while n >= 0x80 {
            self.0.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }

    /// A name (a variant, a struct): its length and bytes, after its value's tag.
    fn name(&mut self, name: &str) {
        self.bytes(name.as_bytes());
    }

    /// A struct field's name: a tag of its own (never the closing tag), then the name.
    fn field(&mut self, name: &str) {
        self.tag(b'.');
        self.name(name);
    }
}

type R = Result<(), Unserializable>;

impl<'b> Serializer for &mut Canon<'b> {
    type Ok = ();
    type Error = Unserializable;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> R {
        self.tag(if v { b'T' } else { b'F' });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> R {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i16(self, v: i16) -> R {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i32(self, v: i32) -> R {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i64(self, v: i64) -> R {
        self.fixed(b'i', &v.to_le_bytes())
    }

    fn serialize_i128(self, v: i128) -> R {
        self.fixed(b'I', &v.to_le_bytes())
    }

    fn serialize_u8(self, v: u8) -> R {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u16(self, v: u16) -> R {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u32(self, v: u32) -> R {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u64(self, v: u64) -> R {
        self.fixed(b'u', &v.to_le_bytes())
    }

    fn serialize_u128(self, v: u128) -> R {
        self.fixed(b'W', &v.to_le_bytes())
    }

    fn serialize_f32(self, v: f32) -> R {
        self.fixed(b'f', &v.to_bits().to_le_bytes())
    }

    fn serialize_f64(self, v: f64) -> R {
        self.fixed(b'd', &v.to_bits().to_le_bytes())
    }

    fn serialize_char(self, v: char) -> R {
        self.fixed(b'c', &u32::from(v).to_le_bytes())
    }

    fn serialize_str(self, v: &str) -> R {
        self.tag(b's');
        self.bytes(v.as_bytes());
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> R {
        self.tag(b'y');
        self.bytes(v);
        Ok(())
    }

    fn serialize_none(self) -> R {
        self.tag(b'N');
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> R {
        self.tag(b'S');
        value.serialize(self)
    }

    fn serialize_unit(self) -> R {
        self.tag(b'0');
        Ok(())
    }

    fn serialize_unit_struct(self, name: &'static str) -> R {
        self.tag(b'1');
        self.name(name);
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> R {
        self.tag(b'v');
        self.name(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, name: &'static str, value: &T) -> R {
        self.tag(b'w');
        self.name(name);
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> R {
        self.tag(b'V');
        self.name(variant);
        value.serialize(self)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, Unserializable> {
        self.tag(b'[');
        Ok(self)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self, Unserializable> {
        self.tag(b'[');
        Ok(self)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self, Unserializable> {
        self.tag(b'<');
        self.name(name);
        self.tag(b'[');
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Unserializable> {
        self.tag(b'>');
        self.name(variant);
        self.tag(b'[');
        Ok(self)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self, Unserializable> {
        self.tag(b'{');
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _len: usize) -> Result<Self, Unserializable> {
        self.tag(b'(');
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Unserializable> {
        self.tag(b'X');
        self.name(variant);
        self.tag(b'(');
        Ok(self)
    }
}

/// Elements: each self-delimiting, then the closing tag.
macro_rules! elements {
    ($trait:ident, $method:ident, $end:expr) => {
        impl<'b> ser::$trait for &mut Canon<'b> {
            type Ok = ();
            type Error = Unserializable;

            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
                value.serialize(&mut **self)
            }

            fn end(self) -> R {
                self.tag($end);
                Ok(())
            }
        }
    };
}

elements!(SerializeSeq, serialize_element, b']');
elements!(SerializeTuple, serialize_element, b']');
elements!(SerializeTupleStruct, serialize_field, b']');
elements!(SerializeTupleVariant, serialize_field, b']');

impl<'b> ser::SerializeMap for &mut Canon<'b> {
    type Ok = ();
    type Error = Unserializable;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> R {
        key.serialize(&mut **self)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }

    fn end(self) -> R {
        self.tag(b'}');
        Ok(())
    }
}

/// Fields: each after its tagged name (a skipped field writes nothing: the names tell which
/// fields are there), then the closing tag.
macro_rules! fields {
    ($trait:ident) => {
        impl<'b> ser::$trait for &mut Canon<'b> {
            type Ok = ();
            type Error = Unserializable;

            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> R {
                self.field(key);
                value.serialize(&mut **self)
            }

            fn end(self) -> R {
                self.tag(STRUCT_END);
                Ok(())
            }
        }
    };
}

fields!(SerializeStruct);
fields!(SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn bytes(v: &impl Serialize) -> Vec<u8> {
        let mut buf = Vec::new();
        write(&mut buf, v).unwrap();
        buf
    }

    #[derive(Serialize)]
    struct Fields {
        #[serde(skip_serializing_if = "Option::is_none")]
        a: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        b: Option<u32>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        c: Vec<String>,
    }

    #[test]
    fn skipped_fields_never_make_two_values_alike() {
        let f = |a, b, c: &[&str]| {
            bytes(&Fields {
                a,
                b,
                c: c.iter().map(|s| (*s).to_owned()).collect(),
            })
        };
        let all = [
            f(None, None, &[]),
            f(Some(1), None, &[]),
            f(None, Some(1), &[]),
            f(Some(1), Some(1), &[]),
            f(None, None, &[""]),
            f(None, None, &["", ""]),
            f(None, None, &["ab"]),
            f(None, None, &["a", "b"]),
        ];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn strings_and_numbers_are_self_delimiting() {
        assert_ne!(bytes(&("ab", "c")), bytes(&("a", "bc")));
        assert_ne!(bytes(&vec!["a,b"]), bytes(&vec!["a", "b"]));
        assert_ne!(bytes(&Some("")), bytes(&None::<&str>));
        assert_ne!(bytes(&1u32), bytes(&1i32));
        assert_ne!(bytes(&0.0f32), bytes(&-0.0f32));
        assert_ne!(bytes(&f32::NAN), bytes(&None::<f32>));
        assert_ne!(bytes(&1.0f32), bytes(&1.0f64));
        let mut m = BTreeMap::new();
        m.insert("k", "v");
        assert_ne!(bytes(&m), bytes(&vec!["k", "v"]));
    }

    #[test]
    fn json_values_of_every_shape_differ() {
        let values: Vec<serde_json::Value> = [
            "null",
            "true",
            "false",
            "0",
            "-1",
            "1.5",
            "\"\"",
            "\"0\"",
            "[]",
            "[null]",
            "{}",
            "{\"a\":null}",
            "{\"a\":[]}",
            "[{}]",
            "[[]]",
            "[\"a\",\"b\"]",
            "[\"ab\"]",
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        for (i, x) in values.iter().enumerate() {
            for y in &values[i + 1..] {
                assert_ne!(bytes(x), bytes(y), "{x} vs {y}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Two requests write the same canonical bytes exactly when they are the same
        /// request (their JSON, with finite numbers, is the oracle).
        #[test]
        fn requests_write_the_same_bytes_only_when_they_are_equal(
            a in request(),
            b in request(),
        ) {
            let json = |r: &crate::ChatRequest| serde_json::to_value(r).unwrap();
            proptest::prop_assert_eq!(json(&a) == json(&b), bytes(&a) == bytes(&b));
            proptest::prop_assert_eq!(bytes(&a), bytes(&a.clone()));
        }
    }

    /// Small requests that differ in few places: roles, texts that run into each
    /// other, optional parameters present or not.
    fn request() -> impl proptest::strategy::Strategy<Value = crate::ChatRequest> {
        use crate::types::Message;
        use proptest::prelude::*;
        let text = prop_oneof![Just(""), Just("a"), Just("ab"), Just("b"), Just("a,b")];
        let message = (0..3u8, text.clone()).prop_map(|(role, t)| match role {
            0 => Message::system(t),
            1 => Message::user(t),
            _ => Message::assistant(t),
        });
        (
            proptest::collection::vec(message, 0..3),
            proptest::option::of(prop_oneof![Just(0.0f32), Just(0.5), Just(1.0)]),
            proptest::option::of(0..3u32),
            proptest::collection::vec(text, 0..2),
        )
            .prop_map(|(messages, temperature, max_tokens, stop)| {
                let mut r = crate::ChatRequest::new();
                r.messages = messages;
                r.params.temperature = temperature;
                r.params.max_tokens = max_tokens;
                r.params.stop = stop.into_iter().map(str::to_owned).collect();
                r
            })
    }

    #[test]
    fn a_field_appended_by_hand_matches_the_serializer() {
        #[derive(Serialize)]
        struct Two<'a> {
            x: u8,
            messages: &'a [&'a str],
        }
        #[derive(Serialize)]
        struct One {
            x: u8,
        }
        let whole = bytes(&Two {
            x: 7,
            messages: &["hi"],
        });
        let mut by_hand = bytes(&One { x: 7 });
        assert_eq!(by_hand.pop(), Some(STRUCT_END));
        write_field_name(&mut by_hand, "messages");
        write(&mut by_hand, &["hi"].as_slice()).unwrap();
        by_hand.push(STRUCT_END);
        assert_eq!(whole, by_hand);
    }
}
