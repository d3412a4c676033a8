//! Which listed keys a storage imports: the prefix and recursion are applied by
//! the listing itself; the regex is matched here against the full key from
//! its start, as Label Studio's `re.match` does (`.*\.jpg$` for "ends in
//! .jpg", `images/` for "starts with images/"). The `regex` crate guarantees linear-time matching, so no
//! user pattern can stall a worker.
use regex::Regex;

use crate::{Error, Result, db::entities::storage};

/// A storage's regex filter, compiled: [`Filter::matches`] is true for keys
/// the regex matches from their start (always, without a regex), but for
/// folder markers where the backend has them. Matching takes linear time
/// in the key.
#[derive(Debug, Clone)]
pub struct Filter {
    regex: Option<Regex>,
    /// Keys ending in `/` are folder markers, not objects
    /// ([`super::Backend::folder_markers`]).
    folder_markers: bool,
}

/// Compiled patterns are capped (10 MiB of program) so a pathological pattern
/// is refused with a message rather than eating memory.
const REGEX_SIZE_LIMIT: usize = 10 << 20;

impl Filter {
    pub fn new(regex_filter: Option<&str>) -> Result<Self> {
        let Some(pattern) = regex_filter.filter(|r| !r.is_empty()) else {
            return Ok(Filter {
                regex: None,
                folder_markers: false,
            });
        };
        let build = |p: &str| {
            regex::RegexBuilder::new(p)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
        };
        let invalid = |e: regex::Error| {
            Error::invalid(
                "invalid_regex",
                Some("regex_filter"),
                format!("invalid regex_filter: {e}"),
            )
        };
        // The pattern must stand on its own: wrapped unchecked, "a)|(b" would
        // become a valid pattern with another meaning.
        build(pattern).map_err(invalid)?;
        let regex = build(&format!("^(?:{pattern})")).map_err(invalid)?;
        Ok(Filter {
            regex: Some(regex),
            folder_markers: false,
        })
    }

    /// The storage's filter, skipping its backend's folder markers.
    pub fn from_storage(storage: &storage::Model) -> Result<Self> {
        let kind = super::BackendKind::parse(&storage.backend)?;
        Ok(Filter {
            folder_markers: super::backend(kind).folder_markers(),
            ..Self::new(storage.regex_filter.as_deref())?
        })
    }

    pub fn matches(&self, key: &str) -> bool {
        if self.folder_markers && key.ends_with('/') {
            return false;
        }
        self.regex.as_ref().is_none_or(|r| r.is_match(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_matches_the_full_key_and_bad_ones_are_refused() {
        let filter = Filter::new(Some(r".*\.jpg$")).unwrap();
        assert!(filter.matches("dir/a.jpg"));
        assert!(!filter.matches("dir/a.jpg.txt"));
        let prefix_like = Filter::new(Some("images/")).unwrap();
        assert!(prefix_like.matches("images/a.png"));
        assert!(
            !prefix_like.matches("thumbs/images/a.png"),
            "anchored at the start, like re.match"
        );
        assert!(Filter::new(None).unwrap().matches("anything"));
        let err = Filter::new(Some("(unclosed")).unwrap_err();
        assert!(matches!(
            err,
            Error::Invalid {
                code: "invalid_regex",
                field: Some("regex_filter"),
                ..
            }
        ));
    }
}
