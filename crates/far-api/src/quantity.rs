//! Memory quantities (`512Mi`, `2Gi`, `1G`) as the CRDs accept them.

/// A memory size parsed from a Kubernetes quantity in whole units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory {
    bytes: u64,
}

/// Why a memory quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not digits followed by an optional suffix.
    #[error(
        "{0:?} is not a memory quantity: use whole numbers with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T (e.g. 512Mi)"
    )]
    Syntax(String),
    /// Larger than any machine.
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// The most digits the schema's pattern lets through.
const MAX_DIGITS: usize = 16;

impl Memory {
    const MIB: u64 = 1 << 20;

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.bytes
    }

    /// The size in MiB, rounded up: a VM never gets less than was asked.
    pub const fn mib_ceil(self) -> u64 {
        self.bytes.div_ceil(Self::MIB)
    }

    /// Parses a quantity such as `512Mi`.
    ///
    /// # Errors
    /// [`QuantityError`] when the text is not a whole number with a known suffix, or overflows.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        let syntax = || QuantityError::Syntax(text.to_owned());
        if digits.is_empty() || digits.starts_with('0') {
            return Err(syntax());
        }
        if digits.len() > MAX_DIGITS {
            return Err(QuantityError::Overflow(text.to_owned()));
        }
        let multiplier: u64 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            _ => return Err(syntax()),
        };
        let value: u64 = digits
            .parse()
            .map_err(|_| QuantityError::Overflow(text.to_owned()))?;
        let bytes = value
            .checked_mul(multiplier)
            .ok_or_else(|| QuantityError::Overflow(text.to_owned()))?;
        Ok(Self { bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patterns::MEMORY_QUANTITY;
    use proptest::prelude::*;

    #[test]
    fn binary_and_decimal_suffixes_parse_to_bytes() {
        assert_eq!(Memory::parse("512Mi").unwrap().bytes(), 512 << 20);
        assert_eq!(Memory::parse("2Gi").unwrap().mib_ceil(), 2048);
        assert_eq!(Memory::parse("1G").unwrap().bytes(), 1_000_000_000);
        assert_eq!(Memory::parse("1G").unwrap().mib_ceil(), 954);
        assert_eq!(Memory::parse("1048576").unwrap().mib_ceil(), 1);
    }

    #[test]
    fn bad_quantities_are_refused_with_the_fix() {
        for bad in [
            "", "Mi", "0", "012Mi", "1.5Gi", "1gi", "-1Gi", "1 Gi", "1Ei",
        ] {
            let err = Memory::parse(bad).unwrap_err();
            assert!(err.to_string().contains("e.g. 512Mi"), "{bad}: {err}");
        }
        assert!(matches!(
            Memory::parse("99999999999999Ti"),
            Err(QuantityError::Overflow(_))
        ));
    }

    proptest! {
        /// The schema's pattern and the parser agree: what admission lets through parses
        /// (or is refused as too large, never as bad syntax), and what it refuses does not parse.
        #[test]
        fn parser_agrees_with_the_schema_pattern(text in "[0-9]{0,17}(Ki|Mi|Gi|Ti|k|M|G|T|Ei|m|)") {
            let pattern = regex::Regex::new(MEMORY_QUANTITY).unwrap();
            match Memory::parse(&text) {
                Ok(_) => prop_assert!(pattern.is_match(&text)),
                Err(QuantityError::Overflow(_)) => {}
                Err(QuantityError::Syntax(_)) => prop_assert!(!pattern.is_match(&text)),
            }
        }

        #[test]
        fn mib_rounding_never_gives_less_than_asked(mib in 1u64..1_000_000, extra in 0u64..(1 << 20)) {
            let m = Memory::parse(&(mib * (1 << 20) + extra).to_string()).unwrap();
            prop_assert!(m.mib_ceil() << 20 >= m.bytes());
            prop_assert!((m.mib_ceil() - 1) << 20 < m.bytes());
        }
    }
}
