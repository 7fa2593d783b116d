"""FHIR R4 export of a coded chart: a Bundle (type collection) of one Condition per code and one Claim.

    Condition  code = ICD-10-CM (system http://hl7.org/fhir/sid/icd-10-cm), the evidence as a note,
               verificationStatus provisional (a model's suggestion until a coder confirms it)
    Claim      diagnosis[]: sequence, the code, type principal|secondary, packageCode = the MS-DRG

The ICD-10-CM and MS-DRG systems are the ones payers use; the diagnosis type carries HL7's `principal`
(ex-diagnosistype) and icdray's own principal|secondary coding (HL7's example value set has no
"secondary"). The patient is a display-only reference: the export carries no identifiers. Validated in
the tests with `fhir.resources` (its R4B models: Condition, Claim and Bundle are R4's).
"""

from __future__ import annotations

from typing import Any

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MS_DRG = "https://www.cms.gov/Medicare/Medicare-Fee-for-Service-Payment/AcuteInpatientPPS/MS-DRG-Classifications-and-Software"
DX_TYPE = "http://terminology.hl7.org/CodeSystem/ex-diagnosistype"
ROLE = "https://github.com/icdray/icdray/fhir/CodeSystem/diagnosis-role"


def _coding(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": ICD10CM, "code": code, "display": display or code}]}


def bundle(chart_id: str, chart: dict[str, Any], created: str) -> dict[str, Any]:
    """The R4 Bundle of one coded chart (`coding.CodedChart.to_dict()`); `created` is an ISO date."""
    subject = {"display": "anonymous"}
    entries = []
    diagnoses = []
    drg = chart.get("drg")
    package = (
        {"coding": [{"system": MS_DRG, "code": str(drg["drg"]), "display": drg["description"]}]}
        if drg
        else None
    )
    for c in chart["codes"]:
        if not c["valid"]:
            continue
        cid = f"{chart_id}-condition-{c['sequence']}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{cid}",
                "resource": {
                    "resourceType": "Condition",
                    "id": cid,
                    "subject": subject,
                    "code": _coding(c["code"], c["description"]),
                    "verificationStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                "code": "provisional",
                            }
                        ]
                    },
                    "note": [{"text": f"evidence: {c['evidence']}; confidence {c['confidence']:.2f}"}],
                },
            }
        )
        kind = [{"system": ROLE, "code": c["role"]}]
        if c["role"] == "principal":
            kind.insert(0, {"system": DX_TYPE, "code": "principal"})
        dx: dict[str, Any] = {
            "sequence": c["sequence"],
            "diagnosisCodeableConcept": _coding(c["code"], c["description"]),
            "type": [{"coding": kind}],
        }
        if package:
            dx["packageCode"] = package
        diagnoses.append(dx)
    claim_id = f"{chart_id}-claim"
    claim = {
        "resourceType": "Claim",
        "id": claim_id,
        "status": "draft",
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}
            ]
        },
        "use": "claim",
        "patient": subject,
        "created": created,
        "provider": {"display": "icdray"},
        "priority": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]
        },
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "unknown"}}],
        "diagnosis": diagnoses,
    }
    entries.append({"fullUrl": f"urn:uuid:{claim_id}", "resource": claim})
    return {"resourceType": "Bundle", "id": chart_id, "type": "collection", "entry": entries}
