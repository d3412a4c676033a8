//! A ListObjectsV2 answer read in one pass: the keys with their metadata,
//! the common prefixes, and the next page's token.
//!
//! The SDK's deserialiser took two fifths of a worker's CPU in a
//! partitioned Files-mode sync (docs/DECISIONS.md, "ListObjectsV2 signed
//! by hand"): it scans the body once to see whether it is an error, and
//! every element it leaves walks again to its end. This reads the tokens
//! once and keeps only the elements a listing uses; every other element
//! (owner, storage class, checksums, the echoed request) is skipped.
//!
//! Nothing in the document is trusted to be small or well formed: a
//! document type declaration is refused (no entity of the server's is
//! expanded), element names must close in order, nesting is bounded, and
//! the caller bounds the body's size.
//!
//! A page asked for with `encoding-type=url` names its keys and prefixes
//! URL-encoded when it says `<EncodingType>url</EncodingType>`; they are
//! decoded here ([`decode_keys`]).
use chrono::{DateTime, Utc};
use xmlparser::{ElementEnd, Token, Tokenizer};

use crate::storage::ObjectMeta;

/// One page of a listing.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Listed {
    pub objects: Vec<ObjectMeta>,
    /// `CommonPrefixes` (with a delimiter), as sent.
    pub prefixes: Vec<String>,
    /// The next page's continuation token, when the page says it is
    /// truncated and gives one.
    pub next: Option<String>,
}

/// Deeper than any ListObjectsV2 answer nests (4: the result, an entry,
/// its owner, the owner's id).
const MAX_DEPTH: usize = 16;

/// The page in `xml`, or what is wrong with it (for the error message).
pub(super) fn parse(xml: &str) -> Result<Listed, String> {
    let mut reader = Reader::default();
    for token in Tokenizer::from(xml) {
        match token.map_err(|e| format!("malformed XML: {e}"))? {
            Token::DtdStart { .. } | Token::EmptyDtd { .. } | Token::EntityDeclaration { .. } => {
                return Err("a document type declaration, which a listing never has".into());
            }
            Token::ElementStart { local, .. } => reader.open(local.as_str())?,
            Token::Text { text } => reader.text(text.as_str(), true)?,
            Token::Cdata { text, .. } => reader.text(text.as_str(), false)?,
            Token::ElementEnd {
                end: ElementEnd::Close(_, local),
                ..
            } => reader.close(Some(local.as_str()))?,
            Token::ElementEnd {
                end: ElementEnd::Empty,
                ..
            } => reader.close(None)?,
            _ => {}
        }
    }
    reader.finish()
}

/// The state of one pass: the open elements' names, the text of the
/// element being read, and the entry being built.
#[derive(Default)]
struct Reader<'a> {
    path: Vec<&'a str>,
    text: String,
    entry: Entry,
    truncated: bool,
    token: Option<String>,
    /// The page says its keys and prefixes are URL-encoded.
    url_encoded: bool,
    listed: Listed,
    /// The root element was seen (and closed, once `path` is empty again).
    rooted: bool,
}

/// The fields of one `Contents` element read so far.
#[derive(Default)]
struct Entry {
    key: Option<String>,
    size: Option<i64>,
    last_modified: Option<DateTime<Utc>>,
    etag: Option<String>,
}

impl<'a> Reader<'a> {
    fn open(&mut self, name: &'a str) -> Result<(), String> {
        // (A second root is the tokenizer's error.)
        if self.path.is_empty() {
            if name != "ListBucketResult" {
                return Err(format!("<{name}> where <ListBucketResult> was expected"));
            }
            self.rooted = true;
        }
        if self.path.len() >= MAX_DEPTH {
            return Err(format!("elements nested over {MAX_DEPTH} deep"));
        }
        self.path.push(name);
        self.text.clear();
        Ok(())
    }

    /// Text inside the current element (`escaped` unless CDATA); kept only
    /// where a field is read from it.
    fn text(&mut self, raw: &str, escaped: bool) -> Result<(), String> {
        if !self.in_field() {
            return Ok(());
        }
        match escaped {
            true => unescape_into(raw, &mut self.text),
            false => {
                self.text.push_str(raw);
                Ok(())
            }
        }
    }

    /// Whether the open element is one whose text a listing uses.
    fn in_field(&self) -> bool {
        matches!(
            self.path.as_slice(),
            [_, "Contents", "Key" | "Size" | "LastModified" | "ETag"]
                | [_, "CommonPrefixes", "Prefix"]
                | [_, "IsTruncated" | "NextContinuationToken" | "EncodingType"]
        )
    }

    /// The end of the open element (`name` as its end tag spells it; `None`
    /// for `<x/>`): its text goes where it belongs.
    fn close(&mut self, name: Option<&str>) -> Result<(), String> {
        let Some(&open) = self.path.last() else {
            return Err("an end tag with no element open".into());
        };
        if name.is_some_and(|name| name != open) {
            return Err(format!("</{}> closes <{open}>", name.unwrap_or_default()));
        }
        let text = std::mem::take(&mut self.text);
        match self.path.as_slice() {
            [_, "Contents", "Key"] => self.entry.key = Some(text),
            [_, "Contents", "Size"] => self.entry.size = text.trim().parse().ok(),
            [_, "Contents", "LastModified"] => {
                self.entry.last_modified = DateTime::parse_from_rfc3339(text.trim())
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
            [_, "Contents", "ETag"] => self.entry.etag = Some(text.trim_matches('"').to_owned()),
            [_, "Contents"] => self.end_entry(),
            [_, "CommonPrefixes", "Prefix"] => self.listed.prefixes.push(text),
            [_, "IsTruncated"] => self.truncated = text.trim() == "true",
            [_, "NextContinuationToken"] => self.token = Some(text),
            [_, "EncodingType"] => self.url_encoded = text.trim() == "url",
            _ => {}
        }
        self.path.pop();
        Ok(())
    }

    /// A `Contents` element ended: its object, when it named a key.
    fn end_entry(&mut self) {
        let entry = std::mem::take(&mut self.entry);
        if let Some(key) = entry.key {
            self.listed.objects.push(ObjectMeta {
                key,
                size: entry.size,
                last_modified: entry.last_modified,
                etag: entry.etag,
            });
        }
    }

    fn finish(mut self) -> Result<Listed, String> {
        if !self.rooted || !self.path.is_empty() {
            return Err("the document ended before </ListBucketResult>".into());
        }
        self.listed.next = self.token.filter(|_| self.truncated);
        if self.url_encoded {
            decode_keys(&mut self.listed)?;
        }
        Ok(self.listed)
    }
}

/// Decodes the keys and prefixes of a page whose answer says they are
/// URL-encoded (`encoding-type=url`). S3 writes a space as `+` (and a `+`
/// as `%2B`), as a form does; a key that is not UTF-8 once decoded, which
/// S3 cannot hold, makes the page unreadable.
pub(super) fn decode_keys(listed: &mut Listed) -> Result<(), String> {
    let keys = listed.objects.iter_mut().map(|o| &mut o.key);
    for text in keys.chain(listed.prefixes.iter_mut()) {
        let plain = text.replace('+', " ");
        let decoded = percent_encoding::percent_decode_str(&plain)
            .decode_utf8()
            .map_err(|_| {
                format!(
                    "the URL-encoded key {:?} is not UTF-8 once decoded",
                    clip(text)
                )
            })?;
        *text = decoded.into_owned();
    }
    Ok(())
}

/// Appends `raw` with XML's references decoded: the five predefined
/// entities and numeric character references. Any other `&` is an error.
pub(super) fn unescape_into(raw: &str, out: &mut String) -> Result<(), String> {
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .filter(|&n| n <= 10)
            .ok_or_else(|| format!("an unterminated reference in {:?}", clip(raw)))?;
        out.push(reference(&after[..semi]).ok_or_else(|| {
            format!(
                "an unknown reference &{}; in {:?}",
                &after[..semi],
                clip(raw)
            )
        })?);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(())
}

/// The character a reference's name (between `&` and `;`) stands for.
fn reference(name: &str) -> Option<char> {
    let code = match name {
        "lt" => return Some('<'),
        "gt" => return Some('>'),
        "amp" => return Some('&'),
        "quot" => return Some('"'),
        "apos" => return Some('\''),
        _ => match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => name.strip_prefix('#')?.parse().ok()?,
        },
    };
    char::from_u32(code)
}

/// The start of a long text, for an error message.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(body: &str) -> Result<Listed, String> {
        parse(&format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{body}</ListBucketResult>"
        ))
    }

    #[test]
    fn entries_prefixes_and_the_token_are_read_and_the_rest_skipped() {
        let listed = page(
            "<Name>b</Name><Prefix>p/</Prefix><KeyCount>3</KeyCount><MaxKeys>2</MaxKeys>\
             <IsTruncated>true</IsTruncated>\
             <Contents><Key>p/a &amp; b&lt;c&gt; &#233;&#x20AC;.json</Key>\
               <LastModified>2026-12-01T10:20:30.000Z</LastModified>\
               <ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><Size>42</Size>\
               <Owner><ID>x</ID><DisplayName>Key</DisplayName></Owner>\
               <StorageClass>STANDARD</StorageClass></Contents>\n  \
             <Contents><Key><![CDATA[p/<raw> & ]]>x</Key><Size>0</Size></Contents>\
             <Contents><Size>1</Size></Contents>\
             <CommonPrefixes><Prefix>p/sub/</Prefix></CommonPrefixes>\
             <CommonPrefixes><Prefix/></CommonPrefixes>\
             <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>",
        )
        .unwrap();
        assert_eq!(
            listed.objects,
            vec![
                ObjectMeta {
                    key: "p/a & b<c> é€.json".into(),
                    size: Some(42),
                    last_modified: DateTime::parse_from_rfc3339("2026-12-01T10:20:30Z")
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                    etag: Some("9b2cf535f27731c974343645a3985328".into()),
                },
                ObjectMeta {
                    key: "p/<raw> & x".into(),
                    size: Some(0),
                    last_modified: None,
                    etag: None,
                },
            ]
        );
        assert_eq!(listed.prefixes, ["p/sub/", ""]);
        assert_eq!(
            listed.next.as_deref(),
            Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=")
        );
    }

    #[test]
    fn a_token_counts_only_on_a_truncated_page() {
        let last = page(
            "<IsTruncated>false</IsTruncated><NextContinuationToken>t</NextContinuationToken>",
        );
        assert_eq!(last.unwrap().next, None);
        assert_eq!(page("").unwrap(), Listed::default());
    }

    #[test]
    fn documents_that_are_not_a_listing_are_refused_with_a_reason() {
        let refused = [
            ("<Error><Code>AccessDenied</Code></Error>", "<Error> where"),
            (
                "<ListBucketResult><Contents></ListBucketResult>",
                "closes <Contents>",
            ),
            ("<ListBucketResult>", "ended before"),
            ("", "ended before"),
            (
                "<!DOCTYPE x [<!ENTITY e \"boom\">]><ListBucketResult>&e;</ListBucketResult>",
                "document type",
            ),
            (
                "<ListBucketResult><Contents><Key>&e;</Key></Contents></ListBucketResult>",
                "unknown reference &e;",
            ),
            (
                "<ListBucketResult><Contents><Key>a &amp b</Key></Contents></ListBucketResult>",
                "reference",
            ),
            ("<ListBucketResult/><ListBucketResult/>", "malformed XML"),
        ];
        for (xml, reason) in refused {
            let err = parse(xml).expect_err(xml);
            assert!(err.contains(reason), "{xml}: {err}");
        }
        let deep = format!(
            "<ListBucketResult>{}{}</ListBucketResult>",
            "<a>".repeat(100),
            "</a>".repeat(100)
        );
        assert!(parse(&deep).unwrap_err().contains("nested over 16"));
    }

    #[test]
    fn url_encoded_keys_and_prefixes_are_decoded_only_when_the_page_says_so() {
        let body = "<Contents><Key>a%01b+c%2Bd%25e%C3%A9%00.json</Key></Contents>\
                    <CommonPrefixes><Prefix>sub+dir%2F%0A/</Prefix></CommonPrefixes>";
        let encoded = page(&format!("{body}<EncodingType>url</EncodingType>")).unwrap();
        assert_eq!(encoded.objects[0].key, "a\u{1}b c+d%e\u{e9}\u{0}.json");
        assert_eq!(encoded.prefixes, ["sub dir/\n/"]);
        for plain in [
            body.to_owned(),
            format!("{body}<EncodingType>none</EncodingType>"),
        ] {
            let listed = page(&plain).unwrap();
            assert_eq!(listed.objects[0].key, "a%01b+c%2Bd%25e%C3%A9%00.json");
            assert_eq!(listed.prefixes, ["sub+dir%2F%0A/"]);
        }
        let not_utf8 = page("<Contents><Key>%FF</Key></Contents><EncodingType>url</EncodingType>");
        assert!(not_utf8.unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn odd_values_leave_a_field_empty_rather_than_fail_the_page() {
        let listed = page(
            "<Contents><Key>k</Key><Size>-x</Size><LastModified>yesterday</LastModified></Contents>",
        )
        .unwrap();
        assert_eq!(
            listed.objects,
            [ObjectMeta {
                key: "k".into(),
                size: None,
                last_modified: None,
                etag: None
            }]
        );
    }
}
