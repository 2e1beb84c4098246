"""Money: integer minor units with an ISO 4217 currency. Never a float.

An amount is always in the currency's minor unit (JPY has none, so 1 = 1 yen; USD has two, so
1 = 1 cent). The table below holds the active ISO 4217 codes and their minor-unit exponents.
"""

from __future__ import annotations

MAX_AMOUNT = 10**12
"""The largest amount a single payment or refund may carry, in minor units."""

# Active ISO 4217 codes (funds and precious metals excluded), by minor-unit exponent.
_CODES_BY_EXPONENT = {
    2: """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP
BYN BZD CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR KES KGS KHR KPW KYD KZT LAK
LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO
NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE
SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VES WST
XCD YER ZAR ZMW ZWL
""",
    0: """
BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF
""",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "UYW",
}
CURRENCY_EXPONENTS: dict[str, int] = {
    code: exponent for exponent, codes in _CODES_BY_EXPONENT.items() for code in codes.split()
}


def is_known_currency(code: str) -> bool:
    """True when ``code`` is an active ISO 4217 currency code (upper case)."""
    return code in CURRENCY_EXPONENTS
